"""LayerNormalization and RMSNormalization: drop-ins for Keras's, computed by one fused kernel."""

from __future__ import annotations

import keras

from fastlayers.kernels import dispatch, normalization
from fastlayers.layers.base import ImplementationArgument, register


class _FusedNormalization(ImplementationArgument):
    """What both layers add to Keras's: checked ``axis`` and ``epsilon`` (Keras
    accepts what its computation then fails on), normalized axes that are known
    when the weights are built, and ``implementation=``."""

    # Every implementation runs these layers (``native`` for trailing axes):
    # ``fastlayers bench --layer`` times each.
    implementations = dispatch.ALL_IMPLEMENTATIONS

    def __init__(self, *args, implementation=None, **kwargs):
        super().__init__(*args, implementation=implementation, **kwargs)
        self.epsilon = normalization.check_epsilon(self.epsilon)
        normalization.check_axis(self.axis)

    def build(self, input_shape):
        _check_normalized_axes(self.name, self.axis, input_shape)
        super().build(input_shape)


@register
class LayerNormalization(_FusedNormalization, keras.layers.LayerNormalization):
    """Layer normalization, a drop-in for ``keras.layers.LayerNormalization``.

    A subclass of Keras 3.15's layer: the constructor arguments (``axis``, one or
    several; ``epsilon``; ``center``; ``scale``; the initializers, regularizers and
    constraints of ``gamma`` and ``beta``; the deprecated ``rms_scaling``), weights
    and their order, masking and ``get_config`` are Keras's, so
    ``ours.set_weights(keras_layer.get_weights())`` reproduces Keras's outputs. Only
    the computation differs: ``kernels.layer_normalization``, with float32
    statistics under every dtype policy; its native op (auto's choice on CPU
    outside training) reads each row once and writes it once, and training runs
    XLA's fused forward and gradient.

    Args:
        *args: the positional arguments of ``keras.layers.LayerNormalization``
            (``axis``, ``epsilon``, ...).
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"`` (CPU; trailing normalized axes). Kept in ``get_config()``.
        **kwargs: the keyword arguments of ``keras.layers.LayerNormalization``.

    Input shape:
        Any tensor whose normalized axes are known.

    Output shape:
        The shape of the input.

    Example:

    >>> layer = LayerNormalization(axis=[1, 2])
    >>> layer(keras.ops.ones((2, 3, 4))).shape
    TensorShape([2, 3, 4])
    """

    def call(self, inputs):
        outputs = normalization.layer_normalization(
            inputs,
            self.gamma,
            self.beta,
            axis=self.axis,
            epsilon=self.epsilon,
            rms_scaling=self.rms_scaling,
            implementation=self.implementation,
        )
        return keras.ops.cast(outputs, self.compute_dtype)


@register
class RMSNormalization(_FusedNormalization, keras.layers.RMSNormalization):
    """Root-mean-square normalization, a drop-in for ``keras.layers.RMSNormalization``.

    ``x * rsqrt(mean(x²) + epsilon) * scale`` over ``axis``. A subclass of Keras
    3.15's layer: its arguments, ``scale`` weight and ``get_config`` are Keras's. The
    computation is ``kernels.rms_normalization`` (the native op's one pass per row,
    or XLA's fused one), with the statistics and the scale in float32 under every
    dtype policy.

    Args:
        axis: int or list/tuple of ints, the axes to normalize over.
        epsilon: non-negative number added to the mean square.
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"`` (CPU; trailing normalized axes). Kept in ``get_config()``.
        **kwargs: the base layer's keyword arguments (``name``, ``dtype``, ...).

    Input shape:
        Any tensor whose normalized axes are known.

    Output shape:
        The shape of the input.

    Example:

    >>> layer = RMSNormalization()
    >>> layer(keras.ops.ones((2, 8))).shape
    TensorShape([2, 8])
    """

    def call(self, x):
        # The variable, not its autocast copy: the scale multiplies in float32.
        outputs = normalization.rms_normalization(
            x,
            self.scale.value,
            axis=self.axis,
            epsilon=self.epsilon,
            implementation=self.implementation,
        )
        return keras.ops.cast(outputs, self.compute_dtype)


def _check_normalized_axes(name, axis, input_shape):
    """Raises a ValueError unless every normalized axis is in range and known."""
    shape = tuple(input_shape)
    try:
        axes = normalization.standardize_axis(axis, len(shape))
    except ValueError as error:
        raise ValueError(
            f"Layer {name!r} cannot normalize over axis={axis!r}: {error} "
            f"Received: input_shape={shape}"
        ) from None
    unknown = [a for a in axes if shape[a] is None]
    if unknown:
        raise ValueError(
            f"Layer {name!r} needs the sizes of the normalized axes {list(axes)} to be "
            f"known to build its weights. Received: input_shape={shape}"
        )
