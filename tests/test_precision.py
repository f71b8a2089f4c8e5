"""The precision helpers: mask values, accumulation dtypes, the tolerance table."""

import numpy as np
import pytest
import tensorflow as tf

from fastlayers.kernels import precision


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
def test_mask_value_stays_finite_after_adding_a_logit(dtype):
    masked = tf.constant(precision.mask_value(dtype), dtype) + tf.constant(-1000.0, dtype)
    assert np.isfinite(masked.numpy().astype(np.float64))
    # and still drowns any real logit in a softmax
    probabilities = tf.nn.softmax(tf.cast(tf.stack([masked, tf.constant(30.0, dtype)]), tf.float32))
    assert probabilities.numpy()[0] == 0.0


@pytest.mark.parametrize(
    "dtype, expected",
    [(tf.float16, tf.float32), (tf.bfloat16, tf.float32), (tf.float32, tf.float32), (tf.float64, tf.float64)],
)
def test_accumulation_dtype(dtype, expected):
    assert precision.accumulation_dtype(dtype) == expected


def test_tolerance_table_covers_every_float_dtype_and_gradients_are_looser():
    for dtype in precision.FLOAT_DTYPES:
        forward = precision.tolerance(dtype)
        gradient = precision.tolerance(dtype, grad=True)
        assert 0 < forward.rtol <= gradient.rtol
        assert 0 < forward.atol <= gradient.atol


def test_tolerance_check_reports_max_and_mean_error():
    tol = precision.Tolerance(rtol=0.0, atol=1e-3)
    tol.check([1.0, 2.0], [1.0005, 2.0])
    with pytest.raises(AssertionError, match=r"out: max error 0.01, mean error 0.005"):
        tol.check([1.01, 2.0], [1.0, 2.0], what="out")

