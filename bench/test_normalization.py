"""LayerNormalization and RMSNormalization against Keras's layers, as pytest-benchmark cases.

Run ``pytest bench/test_normalization.py --benchmark-only``. The issue's shape,
[8192, 1024], in float32 and mixed_bfloat16, called eagerly and inside a
``tf.function``; one ``benchmark.group`` per (layer, policy, mode, device), whose
rows are ``keras`` (``keras.layers.LayerNormalization`` or ``RMSNormalization``,
the baseline), ``auto`` and each implementation. The target is 2x Keras's layer
in every group. pytest-benchmark runs the rows of a group one after another, not
interleaved: on a shared machine compare medians over several runs, or run
``fastlayers bench --layer LayerNormalization``, which interleaves them.
GPU cases skip with a reason when TensorFlow sees no GPU.
"""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf
from fastlayers import layers
from fastlayers.bench import cases, pytest_adapter

SHAPE = (8192, 1024)
ROUNDS = 7
DEVICES = pytest_adapter.DEVICE_PARAMS  # "gpu" skips with a reason when none is visible
PROVIDERS = ("keras", "auto", "reference", "graph", "xla", "native")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("policy", ("float32", "mixed_bfloat16"))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", ("LayerNormalization", "RMSNormalization"))
def test_normalization(benchmark, name, provider, policy, mode, device):
    if provider == "native" and device == "gpu":
        pytest.skip("the native op runs on CPU only")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        with tf.device(cases.tf_device(device)):
            if provider == "keras":
                layer = getattr(keras.layers, name)()
            else:
                implementation = None if provider == "auto" else provider
                layer = getattr(layers, name)(implementation=implementation)
            layer.build(SHAPE)
            x = tf.cast(tf.random.stateless_normal(SHAPE, seed=(0, 0)), layer.compute_dtype)
            call = tf.function(layer) if mode == "function" else layer
            step = lambda: call(x).numpy()  # noqa: E731
            step()  # trace and compile outside the timed rounds
            benchmark.group = f"{name} {'x'.join(map(str, SHAPE))} {policy} {mode} {device}"
            benchmark.extra_info.update({"provider": provider, "policy": policy, "mode": mode})
            benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        keras.config.set_dtype_policy(previous)
