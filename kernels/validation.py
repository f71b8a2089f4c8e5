"""Argument checks shared by kernels and layers, each raising Keras-style errors:
what was wrong, what was expected, and the value received."""

from __future__ import annotations

import numbers

import tensorflow as tf

from fastlayers.kernels.precision import FLOAT_DTYPES


def check_floating(name: str, x) -> tf.DType:
    """Returns the dtype of tensor ``x``, raising TypeError unless it is a float type."""
    dtype = tf.as_dtype(x.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` must have a floating dtype (float16, bfloat16, float32 or float64). "
            f"Received: {name}.dtype={dtype.name}"
        )
    return dtype


def check_same_dtype(leader: str, dtype: tf.DType, **tensors) -> None:
    """Raises TypeError unless every given tensor (None skipped) has ``dtype``, the
    dtype of the argument named ``leader``."""
    for name, t in tensors.items():
        if t is not None and t.dtype != dtype:
            raise TypeError(
                f"`{name}` must have the dtype of `{leader}` ({dtype.name}). "
                f"Received: {name}.dtype={t.dtype.name}"
            )


def check_positive_int(name: str, value) -> int:
    """Returns ``value`` as an int if it is a positive integer (not a bool); else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive integer. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def check_positive_pair(name: str, value) -> tuple[int, int]:
    """``value`` as a pair of positive ints (an int is used for both); else raises."""
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    try:
        pair = tuple(pair)
    except TypeError:
        pair = None
    if (
        pair is None
        or len(pair) != 2
        or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in pair
        )
    ):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive integer or a "
            f"tuple of 2 positive integers. Received: {name}={value!r}"
        )
    return int(pair[0]), int(pair[1])


def standardize_choice(name: str, value, choices) -> str:
    """``value`` lower-cased if it is one of ``choices`` (case-insensitive); else raises."""
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise ValueError(
        f"Received an invalid value for `{name}`, expected one of "
        f"{', '.join(repr(c) for c in choices)}. Received: {name}={value!r}"
    )
