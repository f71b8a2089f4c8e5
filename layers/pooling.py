"""MaxPooling2D: a drop-in for ``keras.layers.MaxPooling2D``."""

from __future__ import annotations

import keras

from fastlayers.kernels import pooling
from fastlayers.kernels.validation import check_positive_pair, standardize_choice
from fastlayers.layers.base import FastLayer, register


@register
class MaxPooling2D(FastLayer):
    """Max pooling over the spatial axes, a drop-in for ``keras.layers.MaxPooling2D``.

    Same constructor arguments, defaults, output (bit for bit: max pooling does not
    round) and gradient as Keras's layer, including the routing of ties: a window's
    gradient goes to the first of its maxima in row-major order. On ``channels_first``
    input the XLA path pools in place instead of transposing to channels_last and
    back, which Keras's TensorFlow backend does.

    Args:
        pool_size: int or tuple of 2 ints, the window's height and width.
        strides: int, tuple of 2 ints, or None (``pool_size``).
        padding: ``"valid"`` or ``"same"`` (case-insensitive). ``"same"`` pads
            evenly, the odd row or column after the input.
        data_format: ``"channels_last"`` (``(batch, height, width, channels)``) or
            ``"channels_first"`` (``(batch, channels, height, width)``); None takes
            ``keras.config.image_data_format()``.
        implementation: None (auto: the fastest for the device, dtype and layout),
            ``"reference"``, ``"graph"`` or ``"xla"``.

    Input shape:
        4D tensor ``(batch, height, width, channels)`` or
        ``(batch, channels, height, width)``. Integer images (uint8, say) are pooled
        by TensorFlow's op, as by Keras's layer, whatever ``implementation``.

    Output shape:
        4D tensor ``(batch, pooled_height, pooled_width, channels)`` or
        ``(batch, channels, pooled_height, pooled_width)``, where a pooled length is
        ``floor((length - pool) / stride) + 1`` for ``"valid"`` and
        ``ceil(length / stride)`` for ``"same"``.

    Raises:
        ValueError: on a bad argument, an input that is not 4D, or (``"valid"``)
            a window larger than the input.

    Example:

    >>> layer = MaxPooling2D(pool_size=2)
    >>> layer(keras.ops.ones((1, 4, 6, 3))).shape
    TensorShape([1, 2, 3, 3])
    """

    def __init__(
        self,
        pool_size=(2, 2),
        strides=None,
        padding="valid",
        data_format=None,
        name=None,
        *,
        implementation=None,
        **kwargs,
    ):
        super().__init__(implementation=implementation, name=name, **kwargs)
        self.pool_size = check_positive_pair("pool_size", pool_size)
        self.strides = check_positive_pair(
            "strides", pool_size if strides is None else strides
        )
        self.padding = standardize_choice("padding", padding, pooling.PADDINGS)
        self.data_format = standardize_choice(
            "data_format",
            keras.config.image_data_format() if data_format is None else data_format,
            pooling.DATA_FORMATS,
        )
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self._build_at_init()  # weightless, as Keras's pooling layers: built, 0 params

    def call(self, inputs):
        # The arguments were checked at construction and the rank by `input_spec`, so
        # an eager call costs no more Python than Keras's layer.
        return pooling.pool_checked(
            inputs, self.pool_size, self.strides, self.padding, self.data_format,
            self.implementation,
        )

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"Layer {self.name!r} expects a 4D input. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        return pooling.pooled_shape(
            input_shape, self.pool_size, self.strides, self.padding, self.data_format
        )

    def get_config(self):
        return {
            **super().get_config(),
            "pool_size": self.pool_size,
            "padding": self.padding,
            "strides": self.strides,
            "data_format": self.data_format,
        }


# Keras exports the layer under both names; the alias is the same class, so configs
# and `.keras` files name MaxPooling2D either way.
MaxPool2D = MaxPooling2D
