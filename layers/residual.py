"""ResidualProjection: the multi-input, multi-output layer of the Keras tutorials."""

from __future__ import annotations

import keras
import tensorflow as tf

from fastlayers import kernels
from fastlayers.kernels import residual
from fastlayers.layers.base import FastLayer, check_positive_int, register


def _as_pair(layer_name, value, what):
    # A single shape (2, 6) is also a tuple of two: its items must be shapes themselves.
    is_shape = lambda s: isinstance(s, (list, tuple, tf.TensorShape))  # noqa: E731
    is_item = is_shape if what == "input_shape" else (lambda t: not is_shape(t))
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(is_item(item) for item in value)
    ):
        raise ValueError(
            f"Layer {layer_name!r} expects a list of two inputs [a, b]. "
            f"Received: {what}={value!r}"
        )
    return value


@register
class ResidualProjection(FastLayer):
    """Inputs ``[a, b]``, outputs ``[a · kernel + b, mean(b, axis=-1)]``.

    The layer with two inputs and two outputs from the Keras "writing your own
    layers" tutorial, with a trainable ``kernel`` of shape ``(a_dim, units)``. The
    matmul and the residual add accumulate in float32 under every dtype policy and
    run as one fused kernel on the compiled paths; the mean sums in float32.

    Args:
        units: positive integer, the last axis of ``b`` and of the first output.
        kernel_initializer: initializer for ``kernel`` (the tutorial's ``"uniform"``
            is ``keras.initializers.RandomUniform``; Glorot by default here).
        kernel_regularizer: regularizer applied to ``kernel``.
        kernel_constraint: constraint applied to ``kernel``.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Input shape:
        A list ``[a, b]``: ``a`` of shape ``(batch, ..., a_dim)`` and ``b`` of shape
        ``(batch, ..., units)`` with the same leading axes.

    Output shape:
        A list: ``(batch, ..., units)`` and ``(batch, ...)``.

    Example:

    >>> a, b = keras.Input((8,)), keras.Input((4,))
    >>> y, mean = ResidualProjection(4)([a, b])
    >>> model = keras.Model([a, b], [y, mean])
    """

    def __init__(
        self,
        units,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        kernel_constraint=None,
        *,
        implementation=None,
        **kwargs,
    ):
        units = check_positive_int("units", units)
        super().__init__(implementation=implementation, **kwargs)
        self.units = units
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)

    def _check_shapes(self, input_shape):
        shape_a, shape_b = (tuple(s) for s in _as_pair(self.name, input_shape, "input_shape"))
        kernel_shape = (shape_a[-1] if shape_a else None, self.units)
        residual.check_residual_shapes(shape_a, shape_b, kernel_shape)
        return shape_a, shape_b

    def build(self, input_shape):
        shape_a, _ = self._check_shapes(input_shape)
        if shape_a[-1] is None:
            raise ValueError(
                f"Layer {self.name!r} needs the last axis of `a` to be known. "
                f"Received: input_shape={tuple(tuple(s) for s in input_shape)}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(shape_a[-1], self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )

    def call(self, inputs):
        a, b = _as_pair(self.name, inputs, "inputs")
        y, mean = kernels.residual_projection(
            a, b, self.kernel, implementation=self.implementation
        )
        return [y, mean]

    def compute_output_shape(self, input_shape):
        shape_a, shape_b = self._check_shapes(input_shape)
        # a and b share their leading axes: each is known where either input knows it.
        leading = tuple(
            p if p is not None else q for p, q in zip(shape_a[:-1], shape_b[:-1], strict=True)
        )
        return [leading + (self.units,), leading]

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
        }
