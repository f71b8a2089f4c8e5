"""Precision rules shared by every kernel, layer and test.

- Matmuls accumulate in float32 (float64 stays float64); softmax, its max and its sum
  run in float32; results are cast back to the compute dtype.
- Mask values are finite and safe for the dtype they are added in.
- ``TOLERANCES`` is the one table every test compares with, keyed by dtype, with a
  looser gradient tolerance beside the forward one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
LOW_PRECISION_DTYPES = (tf.float16, tf.bfloat16)


def accumulation_dtype(dtype) -> tf.DType:
    """The dtype matmul sums and softmax statistics are carried in."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def mask_value(dtype) -> float:
    """A large negative logit that stays finite in ``dtype`` after adding a logit to it.

    ``-1e9`` overflows to ``-inf`` in float16 (max 65504), and ``-inf`` turns a row
    with every key masked into ``0/0``; 70% of the most negative value leaves room.
    """
    return -0.7 * float(tf.as_dtype(dtype).max)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Elementwise closeness: ``|actual - expected| <= atol + rtol * |expected|``."""

    rtol: float
    atol: float

    def check(self, actual, expected, *, what: str = "output") -> None:
        """Raises AssertionError with max and mean errors when out of tolerance."""
        actual = np.asarray(actual, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        error = np.abs(actual - expected)
        summary = (
            f"{what}: max error {np.nanmax(error, initial=0.0):.3g}, "
            f"mean error {np.nanmean(error) if error.size else 0.0:.3g} "
            f"(rtol={self.rtol}, atol={self.atol})"
        )
        np.testing.assert_allclose(
            actual, expected, rtol=self.rtol, atol=self.atol, err_msg=summary
        )


# Forward tolerances allow for the output's rounding to the dtype (half an ulp:
# 2^-12 for float16, 2^-9 for bfloat16) compounded over the epilogue (bias,
# activation) and different summation orders; gradients sum over more terms.
TOLERANCES = {
    "float64": (Tolerance(1e-10, 1e-10), Tolerance(1e-9, 1e-9)),
    "float32": (Tolerance(1e-5, 1e-5), Tolerance(1e-4, 1e-4)),
    "float16": (Tolerance(2e-3, 2e-3), Tolerance(1e-2, 1e-2)),
    "bfloat16": (Tolerance(2e-2, 2e-2), Tolerance(5e-2, 5e-2)),
}


def tolerance(dtype, *, grad: bool = False) -> Tolerance:
    """The tolerance for results computed in ``dtype`` (forward, or ``grad=True``)."""
    forward, gradient = TOLERANCES[tf.as_dtype(dtype).name]
    return gradient if grad else forward
