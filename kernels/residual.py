"""Residual projection: ``[a, b] -> [a · kernel + b, mean(b, axis=-1)]``.

Shape letters: ``a [..., K]``, ``b [..., N]`` with the same leading axes, ``kernel
[K, N]``; outputs ``[..., N]`` and ``[...]``. ``M`` is the product of the leading axes
(the rows of the matmul).

The matmul and the residual add accumulate in float32 and round once; the mean sums
in float32 too (a float16 running sum over a wide row loses its low bits).
"""

from __future__ import annotations

import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels.auto import AUTO
from fastlayers.kernels.dense import rows_matmul, unflatten_rows
from fastlayers.kernels.validation import check_floating, check_same_dtype
from fastlayers.kernels.precision import (
    accumulation_dtype,
)


def residual_projection_reference(a, b, kernel):
    """The spec: contract and add in the accumulation dtype, average, cast back."""
    acc = accumulation_dtype(a.dtype)
    y = tf.tensordot(tf.cast(a, acc), tf.cast(kernel, acc), axes=1) + tf.cast(b, acc)
    mean = tf.reduce_mean(tf.cast(b, acc), axis=-1)
    return tf.cast(y, a.dtype), tf.cast(mean, a.dtype)


def residual_projection_compiled(a, b, kernel):
    """The graph/XLA algorithm: one 2-D ``[M, K]·[K, N]`` matmul with ``b`` in its epilogue.

    Operands are widened as in ``dense_compiled`` (``rows_matmul``).
    """
    acc = accumulation_dtype(a.dtype)
    y = rows_matmul(a, kernel)  # [M, N]
    y = tf.cast(y, acc) + tf.cast(tf.reshape(b, tf.shape(y)), acc)
    y = unflatten_rows(y, a, kernel)
    mean = tf.reduce_mean(tf.cast(b, acc), axis=-1)
    return tf.cast(y, a.dtype), tf.cast(mean, a.dtype)


def _work(a, b, kernel):
    if not (a.shape.is_fully_defined() and kernel.shape.is_fully_defined()):
        return None
    rows = a.shape[:-1].num_elements()
    return flops_lib.dense_flops(rows, *kernel.shape) + 2 * b.shape.num_elements()


RESIDUAL_PROJECTION = dispatch.Kernel(
    "residual_projection",
    residual_projection_reference,
    residual_projection_compiled,
    auto=AUTO["residual_projection"],
    work=_work,
)


def check_residual_shapes(a_shape, b_shape, kernel_shape):
    """Raises unless ``a [..., K]``, ``b [..., N]`` and ``kernel [K, N]`` agree."""
    a_shape, b_shape, kernel_shape = tuple(a_shape), tuple(b_shape), tuple(kernel_shape)
    received = f"Received: a.shape={a_shape}, b.shape={b_shape}, kernel.shape={kernel_shape}"
    if len(a_shape) < 2 or len(a_shape) != len(b_shape):
        raise ValueError(
            "`a` and `b` must have the same rank, 2 or more ([..., K] and [..., N]). "
            + received
        )
    compatible = all(
        p is None or q is None or p == q for p, q in zip(a_shape[:-1], b_shape[:-1], strict=True)
    )
    if not compatible:
        raise ValueError("`a` and `b` must have the same leading axes. " + received)
    if a_shape[-1] is not None and a_shape[-1] != kernel_shape[0]:
        raise ValueError(
            "The last axis of `a` must equal the first axis of `kernel` (K). " + received
        )
    if b_shape[-1] is not None and b_shape[-1] != kernel_shape[1]:
        raise ValueError(
            "The last axis of `b` must equal the last axis of `kernel` (N). " + received
        )


def residual_projection(a, b, kernel, *, implementation=None):
    """``[a · kernel + b, mean(b, axis=-1)]`` with float32 accumulation.

    Args:
        a: ``[..., K]`` floating tensor.
        b: ``[..., N]`` tensor of the dtype of ``a``, the leading axes of ``a``.
        kernel: ``[K, N]`` tensor of the dtype of ``a``.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Returns:
        ``(y, mean)``: ``y [..., N]`` and ``mean [...]``, in the dtype of ``a``.
    """
    dispatch.check_implementation(implementation)
    a, b, kernel = (tf.convert_to_tensor(t) for t in (a, b, kernel))
    dtype = check_floating("a", a)
    if kernel.shape.rank != 2:
        raise ValueError(
            f"`kernel` must have rank 2 ([K, N]). Received: kernel.shape={tuple(kernel.shape)}"
        )
    check_residual_shapes(a.shape, b.shape, kernel.shape)
    check_same_dtype("a", dtype, b=b, kernel=kernel)
    return RESIDUAL_PROJECTION(a, b, kernel, implementation=implementation)
