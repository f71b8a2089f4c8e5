"""Attention's masks under oneDNN: no boolean transpose, so no "DT_BOOL" log line.

With oneDNN on (by default on CPUs with AVX512-VNNI/BF16 or AMX, or with
TF_ENABLE_ONEDNN_OPTS=1) TensorFlow hands every transpose to oneDNN, which has no
boolean one on most CPUs and logs "oneDNN supports DT_BOOL only on platforms with
AVX-512" while training a masked MultiHeadAttention. Keras's layer transposes no
boolean, and neither should ours.
"""

import collections
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from fastlayers import kernels, layers
from fastlayers.kernels.attention import BlockSizes

FLOATS = {tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum, tf.float32.as_datatype_enum,
          tf.float64.as_datatype_enum}


def transposes_by_dtype(concrete):
    """``{dtype name: count}`` of the Transpose ops of a traced function, nested ones included."""
    graph = concrete.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return collections.Counter(tf.dtypes.as_dtype(n.attr["T"].type).name
                               for n in nodes if n.op == "Transpose")


def training_step(call, *inputs):
    """The forward and backward pass of ``call`` in one tf.function, as ``fit`` traces it."""

    @tf.function
    def step(*xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            loss = tf.reduce_sum(tf.cast(call(*xs), tf.float32))
        return tape.gradient(loss, xs)

    return step.get_concrete_function(*inputs)


@pytest.mark.parametrize("block_sizes", [None, BlockSizes(block_q=8, block_k=8)],
                         ids=["whole rows", "tiled"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_the_masked_kernel_transposes_only_floats(block_sizes, is_causal):
    rng = np.random.default_rng(0)
    q, k, v = (tf.constant(rng.standard_normal((2, 24, 2, 4)), tf.float32) for _ in range(3))
    mask = tf.constant(rng.random((2, 1, 24, 24)) > 0.3)

    def attend(q, k, v):
        return kernels.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                             block_sizes=block_sizes, implementation="graph")

    found = transposes_by_dtype(training_step(attend, q, k, v))
    assert found and set(found) <= {"float16", "bfloat16", "float32", "float64"}, found


def test_the_masked_layer_transposes_only_floats():
    layer = layers.MultiHeadAttention(num_heads=2, key_dim=4, implementation="graph")
    x = tf.random.normal((2, 16, 8))
    padding = tf.constant(np.arange(16)[None, :] < np.array([[12], [16]]))

    def attend(x):
        return layer(x, x, query_mask=padding, value_mask=padding, use_causal_mask=True)

    attend(x)
    found = transposes_by_dtype(training_step(attend, x))
    assert set(found) <= {"float32"}, found


TRAIN_WITH_ONEDNN = textwrap.dedent("""
    import numpy as np, keras
    from fastlayers import layers
    tokens = keras.Input((16,), dtype="int32")
    x = keras.layers.Embedding(50, 8, mask_zero=True)(tokens)
    x = layers.MultiHeadAttention(num_heads=2, key_dim=4, implementation="graph")(
        x, x, use_causal_mask=True)
    model = keras.Model(tokens, keras.layers.Dense(1)(x))
    model.compile("adam", "mse")
    data = np.random.default_rng(0).integers(1, 50, (8, 16))
    data[:, 12:] = 0
    model.fit(data, np.zeros((8, 16, 1)), epochs=1, verbose=0)
    print("trained")
""")


def test_training_with_onednn_logs_no_dtype_fallback():
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "0"}
    done = subprocess.run([sys.executable, "-c", TRAIN_WITH_ONEDNN], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "trained"
    assert "oneDNN custom operations are on" in done.stderr  # oneDNN really was on
    assert "only on platforms with AVX-512" not in done.stderr, [
        line for line in done.stderr.splitlines() if "AVX-512" in line]
