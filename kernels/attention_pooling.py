"""Additive attention pooling: a learned weighted mean over time.

``e = tanh(x·w + b)``, ``α = softmax(e)`` over time (masked steps get zero weight),
``context = Σ_t α_t · x_t``.

Shape letters: ``B`` batch, ``T`` time steps, ``F`` features. ``x [B, T, F]``,
``weight [F, 1]``, ``bias [1]`` (one bias for every step) or ``[T, 1]`` (one per
step), ``mask [B, T]`` boolean, output ``[B, F]``.
"""

from __future__ import annotations

import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels.auto import AUTO
from fastlayers.kernels.validation import check_floating, check_same_dtype
from fastlayers.kernels.precision import (
    accumulation_dtype,
    mask_value,
)


def _masked_softmax(e, mask):
    """Softmax over the last axis in ``e``'s (float32) dtype; an all-masked row gives 0."""
    if mask is None:
        return tf.nn.softmax(e, axis=-1)
    e = tf.where(mask, e, mask_value(e.dtype))
    weights = tf.exp(e - tf.stop_gradient(tf.reduce_max(e, axis=-1, keepdims=True)))
    weights = tf.where(mask, weights, tf.zeros([], e.dtype))
    total = tf.reduce_sum(weights, axis=-1, keepdims=True)
    return weights / tf.where(total > 0, total, tf.ones([], e.dtype))


def _hide_masked_steps(x, mask):
    """``x`` with masked steps zeroed by a select.

    A masked step gets zero weight, but the pooling product still multiplies that
    zero with the step (and the score's gradient multiplies with it too): ``0·NaN``
    is NaN, so NaN or Inf in padding would reach the whole row.
    """
    if mask is None:
        return x
    return tf.where(mask[..., None], x, tf.zeros([], x.dtype))


def attention_pooling_reference(x, weight, bias, mask=None):
    """The spec, as the tutorial writes it, in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    x32 = _hide_masked_steps(tf.cast(x, acc), mask)
    e = tf.tanh(tf.tensordot(x32, tf.cast(weight, acc), axes=1) + tf.cast(bias, acc))  # [B, T, 1]
    alpha = _masked_softmax(tf.squeeze(e, axis=-1), mask)  # [B, T]
    context = tf.reduce_sum(x32 * alpha[..., None], axis=1)
    return tf.cast(context, x.dtype)


def attention_pooling_compiled(x, weight, bias, mask=None):
    """The graph/XLA algorithm: one matrix-vector product for the scores and one
    batched ``[1, T]·[T, F]`` product for the context, no ``[B, T, F]`` temporary."""
    acc = accumulation_dtype(x.dtype)
    x32 = _hide_masked_steps(tf.cast(x, acc), mask)
    shape = tf.shape(x)  # dynamic: the traced function is shared across shapes
    e = tf.matmul(tf.reshape(x32, [-1, shape[2]]), tf.cast(weight, acc))  # [B·T, 1]
    e = tf.reshape(e, shape[:2]) + tf.reshape(tf.cast(bias, acc), [1, -1])
    alpha = _masked_softmax(tf.tanh(e), mask)
    context = tf.matmul(alpha[:, None, :], x32)  # [B, 1, T]·[B, T, F]
    return tf.cast(tf.squeeze(context, axis=1), x.dtype)


def _work(x, weight, bias, mask=None):
    return None if not x.shape.is_fully_defined() else flops_lib.attention_pooling_flops(*x.shape)


ATTENTION_POOLING = dispatch.Kernel(
    "attention_pooling",
    attention_pooling_reference,
    attention_pooling_compiled,
    auto=AUTO["attention_pooling"],
    work=_work,
)


def _check_pooling_inputs(x, weight, bias, mask):
    dtype = check_floating("x", x)
    if x.shape.rank != 3:
        raise ValueError(f"`x` must have rank 3 ([B, T, F]). Received: x.shape={tuple(x.shape)}")
    time_steps, features = x.shape[1], x.shape[2]
    if tuple(weight.shape) != (features, 1):
        raise ValueError(
            f"`weight` must have shape (F, 1) = ({features}, 1). "
            f"Received: weight.shape={tuple(weight.shape)}"
        )
    if tuple(bias.shape) not in ((1,), (time_steps, 1)):
        raise ValueError(
            f"`bias` must have shape (1,) (shared by every step) or (T, 1) = ({time_steps}, 1) "
            f"(one per step). Received: bias.shape={tuple(bias.shape)}, x.shape={tuple(x.shape)}"
        )
    check_same_dtype("x", dtype, weight=weight, bias=bias)
    if mask is not None:
        if mask.dtype != tf.bool:
            raise TypeError(f"`mask` must be a boolean tensor. Received: mask.dtype={mask.dtype.name}")
        if mask.shape.rank != 2 or not mask.shape.is_compatible_with(x.shape[:2]):
            raise ValueError(
                f"`mask` must have shape [B, T] = {list(x.shape[:2])}. "
                f"Received: mask.shape={tuple(mask.shape)}"
            )


def attention_pooling(x, weight, bias, mask=None, *, implementation=None):
    """``Σ_t softmax_t(tanh(x·weight + bias)) · x_t`` with the softmax in float32.

    Args:
        x: ``[B, T, F]`` floating tensor.
        weight: ``[F, 1]`` tensor of the dtype of ``x``.
        bias: ``[1]`` or ``[T, 1]`` tensor of the dtype of ``x``.
        mask: optional ``[B, T]`` boolean tensor; False steps get zero weight and are
            never read (NaN there reaches no output or gradient), and a row with
            every step masked pools to zeros.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Returns:
        ``[B, F]`` tensor of the dtype of ``x``.
    """
    dispatch.check_implementation(implementation)
    x = tf.convert_to_tensor(x)
    weight = tf.convert_to_tensor(weight)
    bias = tf.convert_to_tensor(bias)
    mask = None if mask is None else tf.convert_to_tensor(mask)
    _check_pooling_inputs(x, weight, bias, mask)
    return ATTENTION_POOLING(x, weight, bias, mask, implementation=implementation)
