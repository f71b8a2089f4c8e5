"""FixedMask and CenterZero: multiply by a constant mask, or zero a centred window."""

from __future__ import annotations

import keras
import numpy as np

from fastlayers import kernels
from fastlayers.kernels import masking
from fastlayers.kernels.validation import check_positive_pair
from fastlayers.layers.base import FastLayer, register


@register
class FixedMask(FastLayer):
    """Multiplies the input by a constant mask that broadcasts over the batch.

    The mask is a constant of the layer, not a weight: it is absent from
    ``layer.weights`` (no optimizer or checkpoint sees it) and is saved in the
    config as a nested list, so a ``.keras`` file carries it. It is cast to the
    compute dtype at call time, so under float16/bfloat16 policies its values are
    rounded to that dtype.

    Args:
        mask: array-like of numbers whose shape broadcasts against the input without
            its batch axis and leaves that shape unchanged, e.g. ``(H, W)`` for
            inputs ``(batch, H, W)`` or ``(batch, C, H, W)``; or that shape behind a
            leading batch axis of size 1, ``(1, H, W)`` for inputs ``(batch, H, W)``,
            as numpy broadcasts ``x * mask``. A mask that would grow the input fails,
            at run time where the input's axes are unknown when traced.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Input shape:
        ``(batch, ...)``: a batch axis, then at least the mask's axes.

    Output shape:
        The input's shape.

    Example:

    >>> layer = FixedMask([[1.0, 0.0], [0.0, 1.0]])
    >>> layer(keras.ops.ones((3, 2, 2)))[0]  # doctest: +SKIP
    [[1., 0.], [0., 1.]]
    """

    def __init__(self, mask, *, implementation=None, **kwargs):
        try:
            array = np.asarray(mask, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(
                "Received an invalid value for `mask`, expected a (nested) list or array "
                f"of numbers. Received: mask={mask!r}"
            ) from error
        super().__init__(implementation=implementation, **kwargs)
        self.mask = array
        self.supports_masking = True
        # Weightless: built at construction, as in Keras. The input's shape is checked
        # by the kernel at call time and by compute_output_shape on symbolic inputs.
        self._build_at_init()

    def call(self, inputs):
        return kernels.fixed_mask(inputs, self.mask, implementation=self.implementation)

    def compute_output_shape(self, input_shape):
        masking.check_mask_broadcasts(self.mask.shape, input_shape)
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "mask": self.mask.tolist()}


@register
class CenterZero(FastLayer):
    """Zeroes the centred ``size`` window of the last two axes; the rest passes through.

    On a 10x10 input of sixes with ``size=(2, 2)``, rows and columns 4 and 5 become
    zero. The window starts at ``(H - h) // 2`` and ``(W - w) // 2``: when ``H - h``
    (or ``W - w``) is odd it sits half a row nearer the top (or left), the extra row
    (column) left below (right of) it. The window is set to zero, not multiplied by
    zero, so inf or NaN inside it become 0; outside it the input is unchanged. The
    gradient is 0 inside the window and 1 outside.

    Args:
        size: int or tuple of 2 positive ints ``(h, w)``, the window's height and
            width, at most the input's last two axes.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Input shape:
        ``(..., H, W)``, rank 2 or more, with ``H`` and ``W`` known. The window is
        always over the last two axes, whatever the rank: a rank-2 input is one 2-D
        array ``(H, W)``, not a batch, so its first axis is one of the two windowed
        axes (the tutorial calls the layer on a bare ``(10, 10)`` array this way).
        A batch of such arrays is ``(batch, H, W)``.

    Output shape:
        The input's shape.

    Example:

    >>> layer = CenterZero(size=(2, 2))
    >>> layer(keras.ops.full((1, 10, 10), 6.0))[0, 4:6, 3:7]  # doctest: +SKIP
    [[6., 0., 0., 6.], [6., 0., 0., 6.]]
    """

    def __init__(self, size=(2, 2), *, implementation=None, **kwargs):
        super().__init__(implementation=implementation, **kwargs)
        self.size = check_positive_pair("size", size)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True
        # Weightless: built at construction, as in Keras. The input's shape is checked
        # by the kernel at call time and by compute_output_shape on symbolic inputs.
        self._build_at_init()

    def call(self, inputs):
        return kernels.center_zero(inputs, self.size, implementation=self.implementation)

    def compute_output_shape(self, input_shape):
        masking.check_center_window(input_shape, self.size)
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "size": self.size}
