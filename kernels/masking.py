"""Constant masks: multiply by a fixed mask, or zero a centred window.

Shape letters: ``x [B, ..., H, W]`` where ``H`` and ``W`` are the last two axes (rows
and columns of the window), ``B`` the batch; a fixed ``mask`` has a shape that
broadcasts against ``x.shape[1:]`` without changing it, or that shape behind a
leading batch axis of size 1.

The centred window of ``size = (h, w)`` covers rows ``[(H - h) // 2, (H - h) // 2 + h)``
and the same for columns. When ``H - h`` is odd the window sits half a row nearer the
top (the extra row is left below it), and likewise nearer the left: the rule of
TensorFlow's ``"same"`` padding, which puts the odd row after the input.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels.auto import AUTO


def fixed_mask_reference(x, mask):
    """The spec: ``x * mask`` in the dtype of ``x``, the mask broadcast over the batch.

    ``mask`` spans the axes after the batch (see ``feature_mask_shape``).
    """
    y = x * tf.cast(mask, x.dtype)
    if x.shape.rank is None or not x.shape[1:].is_fully_defined():
        # Where an axis of x is unknown here, the product would broadcast a larger
        # mask axis over a run-time size of 1 and grow x. The assertion names the
        # shapes (XLA drops assertions); the reshape to the shape of x is free when
        # the mask fits and fails anywhere when y grew, as y then has more elements.
        # (Not tf.broadcast_to(mask, ...): grappler drops it as a no-op in graph mode.)
        fits = tf.debugging.Assert(
            tf.reduce_all(tf.equal(tf.shape(y), tf.shape(x))),
            [
                "`mask` must broadcast against the input without its batch axis, "
                "leaving its shape unchanged. Received: mask.shape=",
                tf.shape(mask),
                "inputs.shape=",
                tf.shape(x),
            ],
        )
        with tf.control_dependencies([fits]):
            y = tf.reshape(y, tf.shape(x))
    return y


def _elementwise_work(x, *_, **__):
    return None if not x.shape.is_fully_defined() else flops_lib.elementwise_flops(x.shape.num_elements())


FIXED_MASK = dispatch.Kernel(
    "fixed_mask", fixed_mask_reference, auto=AUTO["fixed_mask"], work=_elementwise_work
)


def feature_mask_shape(mask_shape, input_rank):
    """``mask_shape`` without a leading batch axis of size 1, if it has one.

    A mask of the input's rank whose first axis is 1 spans the batch axis too, as in
    numpy's ``x * mask``; any other mask spans the input's axes after the batch.
    """
    mask_shape = tuple(mask_shape)
    if input_rank == len(mask_shape) >= 1 and mask_shape[0] == 1:
        return mask_shape[1:]
    return mask_shape


def check_mask_broadcasts(mask_shape, input_shape):
    """Raises unless ``mask_shape`` broadcasts against ``input_shape`` unchanged.

    The mask spans the axes after the batch, or all of them with a leading 1 for the
    batch (``feature_mask_shape``). Unknown input axes accept any mask axis here;
    ``fixed_mask_reference`` checks them at run time.
    """
    mask_shape, input_shape = tuple(mask_shape), tuple(input_shape)
    received = f"Received: mask.shape={mask_shape}, inputs.shape={input_shape}"
    min_rank = max(len(mask_shape) + (0 if mask_shape[:1] == (1,) else 1), 1)
    if len(input_shape) < min_rank:
        raise ValueError(
            f"The input must have rank {min_rank} or more: a batch axis and the mask's "
            f"axes after it. {received}"
        )
    mask_features = feature_mask_shape(mask_shape, len(input_shape))
    features = input_shape[1:]
    fits = all(
        m == 1 or f is None or m == f
        # Broadcasting aligns trailing axes; a shorter mask repeats over the rest.
        for m, f in zip(reversed(mask_features), reversed(features), strict=False)
    )
    if not fits:
        raise ValueError(
            "`mask` must broadcast against the input without its batch axis, leaving its "
            f"shape unchanged: mask.shape={mask_features} cannot broadcast to {features}. "
            + received
        )


def fixed_mask(x, mask, *, implementation=None):
    """``x * mask`` for a constant ``mask`` that broadcasts over the batch.

    Args:
        x: ``[B, ...]`` floating tensor.
        mask: array-like whose shape broadcasts against ``x.shape[1:]`` unchanged,
            optionally with a leading batch axis of size 1 (``x.shape`` ``(B, 3, 4)``
            takes ``(3, 4)``, ``(4,)``, ``(1, 3, 4)``); cast to the dtype of ``x``.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    x = dispatch.floating_input(x, implementation)
    if x.shape.rank is None:
        raise ValueError(
            f"`x` must have a known rank (1 or more). Received: x.shape={tuple(x.shape)}"
        )
    mask = tf.convert_to_tensor(mask)
    check_mask_broadcasts(mask.shape, x.shape)
    features = feature_mask_shape(mask.shape, x.shape.rank)
    if len(features) < mask.shape.rank:
        mask = tf.reshape(mask, features)  # drops the batch axis of size 1
    return FIXED_MASK(x, mask, implementation=implementation)


def center_window(rows, cols, size):
    """The ``(row_start, col_start)`` of the centred ``size`` window on a rows x cols grid."""
    return (rows - size[0]) // 2, (cols - size[1]) // 2


def center_zero_mask(rows, cols, size):
    """A ``[rows, cols]`` numpy array of ones with the centred ``size`` window zeroed."""
    top, left = center_window(rows, cols, size)
    mask = np.ones((rows, cols))
    mask[top : top + size[0], left : left + size[1]] = 0
    return mask


def center_zero_reference(x, *, size):
    """The spec: select zero inside the centred window of the last two axes, else ``x``.

    A select, not a product with a 0/1 mask, so the window is zero even where ``x`` is
    inf or NaN (``inf * 0`` is NaN).
    """
    # Dynamic sizes: a shape-generic trace (reduce_retracing) has no static H and W.
    rows, cols = tf.shape(x)[-2], tf.shape(x)[-1]
    top, left = center_window(rows, cols, size)
    row = tf.range(rows)[:, None]  # [H, 1]
    col = tf.range(cols)[None, :]  # [1, W]
    inside = (
        (row >= top) & (row < top + size[0]) & (col >= left) & (col < left + size[1])
    )  # [H, W]
    return tf.where(inside, tf.zeros([], x.dtype), x)


CENTER_ZERO = dispatch.Kernel(
    "center_zero", center_zero_reference, auto=AUTO["center_zero"], work=_elementwise_work
)


def center_zero(x, size=(2, 2), *, implementation=None):
    """Zeroes the centred ``size`` window of the last two axes of ``x``.

    Args:
        x: ``[..., H, W]`` floating tensor, rank 2 or more, ``H`` and ``W`` known.
        size: tuple of 2 positive ints ``(h, w)``, at most ``(H, W)``.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    x = dispatch.floating_input(x, implementation)
    check_center_window(x.shape, size)
    return CENTER_ZERO(x, size=tuple(size), implementation=implementation)


def check_center_window(input_shape, size):
    """Raises unless the last two axes of ``input_shape`` are known and hold ``size``."""
    input_shape = tuple(input_shape)
    if len(input_shape) < 2:
        raise ValueError(
            "The input must have rank 2 or more ([..., H, W]). "
            f"Received: inputs.shape={input_shape}"
        )
    rows, cols = input_shape[-2:]
    if rows is None or cols is None:
        raise ValueError(
            "The last two axes of the input must be known to centre the window. "
            f"Received: inputs.shape={input_shape}"
        )
    if size[0] > rows or size[1] > cols:
        raise ValueError(
            "`size` must fit in the last two axes of the input. "
            f"Received: size={tuple(size)}, inputs.shape={input_shape}"
        )
