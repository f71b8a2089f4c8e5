"""Every wrong rank, shape, dtype and argument value across the public API gets a
ValueError or TypeError that names the argument and the value received, raised
before any TensorFlow op can fail with an InvalidArgumentError."""

import numpy as np
import pytest
import tensorflow as tf

from fastlayers import kernels, layers


def _call(layer, *shapes, dtype="float32"):
    def run():
        for shape in shapes:
            layer(np.ones(shape, dtype))

    return run


BAD_INPUTS = [
    # (id, thunk, error type, message pattern)
    ("dense units zero", lambda: layers.Dense(0), ValueError, r"Received: units=0"),
    ("dense units float", lambda: layers.Dense(2.0), ValueError, r"Received: units=2.0"),
    ("dense activation", lambda: layers.Dense(2, activation="nope"), ValueError, r"Received: activation='nope'"),
    ("dense implementation", lambda: layers.Dense(2, implementation="cuda"), ValueError,
     r"Received: implementation='cuda'"),
    ("dense rank 1", _call(layers.Dense(2), (4,)), ValueError, r"min_ndim=2.*received: \(4,\)"),
    ("dense last axis", _call(layers.Dense(2), (1, 4), (1, 3)), ValueError,
     r"axis -1 of input shape to have value 4.*\(1, 3\)"),
    ("linear units", lambda: layers.Linear(-1), ValueError, r"Received: units=-1"),
    ("linear input_dim", lambda: layers.Linear(2, input_dim=0), ValueError, r"Received: input_dim=0"),
    ("linear last axis", _call(layers.Linear(2, input_dim=3), (2, 4)), ValueError,
     r"axis -1 of input shape to have value 3"),
    ("kernel x rank", lambda: kernels.dense(tf.ones([3]), tf.ones([3, 2])), ValueError,
     r"Received: x.shape=\(3,\)"),
    ("kernel shapes", lambda: kernels.dense(tf.ones([2, 3]), tf.ones([4, 2])), ValueError,
     r"x.shape=\(2, 3\), kernel.shape=\(4, 2\)"),
    ("kernel bias", lambda: kernels.dense(tf.ones([2, 3]), tf.ones([3, 2]), tf.ones([3])), ValueError,
     r"bias.shape=\(3,\)"),
    ("kernel int dtype", lambda: kernels.dense(tf.ones([2, 3], tf.int32), tf.ones([3, 2], tf.int32)),
     TypeError, r"Received: x.dtype=int32"),
    ("kernel mixed dtypes", lambda: kernels.dense(tf.ones([2, 3]), tf.ones([3, 2], tf.bfloat16)),
     TypeError, r"Received: kernel.dtype=bfloat16"),
    ("maxpool rank", _call(layers.MaxPooling2D(), (2, 4, 4)), ValueError, r"expected ndim=4, found ndim=3"),
    ("maxpool too big", _call(layers.MaxPooling2D(3), (1, 2, 5, 1)), ValueError,
     r"pool_size=\(3, 3\), inputs.shape=\(1, 2, 5, 1\)"),
    ("maxpool padding", lambda: layers.MaxPooling2D(padding="full"), ValueError, r"padding.*'full'"),
    ("fixed mask broadcast", _call(layers.FixedMask(np.ones((3, 4))), (2, 5, 4)), ValueError,
     r"mask.shape=\(3, 4\)"),
    ("fixed mask rank", _call(layers.FixedMask(np.ones((3, 4))), (3, 4)), ValueError,
     r"rank 3 or more.*Received: mask.shape=\(3, 4\), inputs.shape=\(3, 4\)"),
    ("fixed mask value", lambda: layers.FixedMask("ones"), ValueError, r"Received: mask='ones'"),
    ("center zero window", _call(layers.CenterZero((3, 2)), (1, 2, 5)), ValueError,
     r"size=\(3, 2\), inputs.shape=\(1, 2, 5\)"),
    ("center zero size", lambda: layers.CenterZero((2, 0)), ValueError, r"Received: size=\(2, 0\)"),
    ("center zero rank", _call(layers.CenterZero(), (5,)), ValueError, r"min_ndim=2, found ndim=1"),
    ("exponential dtype", lambda: kernels.exponential(tf.ones([2], tf.int32)), TypeError,
     r"Received: x.dtype=int32"),
    ("residual not a pair", _call(layers.ResidualProjection(2), (3, 2)), ValueError,
     r"list of two inputs \[a, b\]. Received: input_shape=\(3, 2\)"),
    ("residual units", lambda: layers.ResidualProjection(0), ValueError, r"Received: units=0"),
    ("kernel implementation", lambda: kernels.dense(tf.ones([2, 3]), tf.ones([3, 2]), implementation=1),
     ValueError, r"Received: implementation=1"),
]


@pytest.mark.parametrize("thunk, error, message", [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_named(thunk, error, message):
    with pytest.raises(error, match=message) as raised:
        thunk()
    assert not isinstance(raised.value, tf.errors.OpError)
