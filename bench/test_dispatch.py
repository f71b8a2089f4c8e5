"""The cost auto adds to an eager call, as pytest-benchmark cases.

``pytest bench/test_dispatch.py --benchmark-only``. A cached lookup (this machine's
tuned choice for a call signature already looked up once) must cost at most
``LOOKUP_TARGET_SECONDS`` per eager call; the table's choice, with no tuning cache
for the kernel, is the baseline. Both select for a Dense-sized call.
"""

import keras
import pytest
import tensorflow as tf
from fastlayers.kernels import dispatch, tuning
from fastlayers.kernels.dense import DENSE

LOOKUP_TARGET_SECONDS = 20e-6


@pytest.fixture
def dense_call(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.AUTOTUNE_ENV, raising=False)
    tuning.reset()
    tensors = (tf.zeros([4096, 1024]), tf.zeros([1024, 4096]), tf.zeros([4096]))
    options = {"activation": keras.activations.relu}
    yield tensors, options
    tuning.reset()


def _select(tensors, options):
    return DENSE.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32,
                        tensors=tensors, **options)


@pytest.mark.parametrize("source", ["table", "tuned"])
def test_eager_auto_lookup(benchmark, dense_call, source):
    tensors, options = dense_call
    if source == "tuned":
        key = tuning.make_key(DENSE, tensors, options, platform=dispatch.cpu_platform(),
                              dtype=tf.float32)
        tuning.cache().store(key, {"implementation": "graph", "variant": None})
    assert _select(tensors, options).source == source
    benchmark(_select, tensors, options)
    benchmark.extra_info["target_seconds"] = LOOKUP_TARGET_SECONDS
    assert benchmark.stats.stats.median <= LOOKUP_TARGET_SECONDS
