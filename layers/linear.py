"""Linear: the tutorial's first custom layer, ``inputs · w + b``."""

from __future__ import annotations

import keras

from fastlayers import kernels
from fastlayers.layers.base import FastLayer, check_positive_int, register


@register
class Linear(FastLayer):
    """``outputs = inputs · w + b``, the layer every Keras tutorial starts with.

    With ``input_dim`` the weights are created at construction, as in the tutorial;
    without it they are created in ``build`` from the first input's last axis.

    Args:
        units: positive integer, the size of the output's last axis.
        input_dim: optional positive integer, the size of the input's last axis.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Input shape:
        ``(batch_size, ..., input_dim)``.

    Output shape:
        ``(batch_size, ..., units)``.

    Example:

    >>> layer = Linear(4, input_dim=2)
    >>> layer(keras.ops.ones((3, 2))).shape
    TensorShape([3, 4])
    """

    def __init__(self, units=32, input_dim=None, *, implementation=None, **kwargs):
        units = check_positive_int("units", units)
        if input_dim is not None:
            input_dim = check_positive_int("input_dim", input_dim)
        super().__init__(implementation=implementation, **kwargs)
        self.units = units
        self.input_dim = input_dim
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True
        if input_dim is not None:
            self.build((None, input_dim))

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.w = self.add_weight(
            name="w", shape=(input_dim, self.units), initializer="random_normal"
        )
        self.b = self.add_weight(name="b", shape=(self.units,), initializer="zeros")
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

    def call(self, inputs):
        return kernels.dense(inputs, self.w, self.b, implementation=self.implementation)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "input_dim": self.input_dim}
