"""Exponential: the element-wise ``exp`` that tutorials write as a ``Lambda``."""

from __future__ import annotations

from fastlayers import kernels
from fastlayers.layers.base import FastLayer, register


@register
class Exponential(FastLayer):
    """Element-wise ``exp(inputs)``, a registered layer in place of ``Lambda(tf.exp)``.

    A model holding a ``Lambda`` layer refuses to load with ``safe_mode=True``
    (its Python function is stored as bytecode); this layer has no code in its
    config, so models that use it load in safe mode.

    Overflow: the result is computed in the compute dtype, so under ``float16`` and
    ``mixed_float16`` policies ``exp(x)`` is ``inf`` for ``x > ln(65504) ≈ 11.09``,
    exactly as ``tf.exp`` and ``Lambda(tf.exp)`` give; bfloat16 and float32 overflow
    only above about 88.7. Clip the input first if that range matters.

    Args:
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Input shape:
        Any.

    Output shape:
        The input's shape.

    Example:

    >>> Exponential()(keras.ops.zeros((2, 3)))  # doctest: +SKIP
    [[1., 1., 1.], [1., 1., 1.]]
    """

    def __init__(self, *, implementation=None, **kwargs):
        super().__init__(implementation=implementation, **kwargs)
        self.supports_masking = True
        self._build_at_init()  # weightless: built at construction, as in Keras

    def call(self, inputs):
        return kernels.exponential(inputs, implementation=self.implementation)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)
