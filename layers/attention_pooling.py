"""AttentionPooling: the tutorials' additive attention, pooling a sequence to one vector."""

from __future__ import annotations

import keras

from fastlayers import kernels
from fastlayers.layers.base import FastLayer, register


@register
class AttentionPooling(FastLayer):
    """Additive attention pooling: ``Σ_t softmax_t(tanh(x_t·W + b)) · x_t``.

    The layer of the classic Keras attention tutorial: a score per time step
    ``e = tanh(x·W + b)``, weights ``α = softmax(e)`` over time, and the weighted sum
    of the steps. Masked steps (Keras masking, e.g. from ``Embedding(mask_zero=True)``)
    get zero weight, and a sequence with every step masked pools to zeros. The softmax
    runs in float32 under every dtype policy.

    The tutorial's bias has shape ``(T, 1)``, one per step, which ties the layer to
    the sequence length it was built with. By default this layer uses one bias shared
    by every step (shape ``(1,)``), so it pools sequences of any length, as a pooling
    layer is expected to; ``per_step_bias=True`` gives the tutorial's ``(T, 1)`` bias
    (and its weights), and then every input must have the length it was built with.

    Args:
        per_step_bias: whether the bias has one value per time step (shape ``(T, 1)``,
            fixed length) instead of one shared value (shape ``(1,)``).
        kernel_initializer: initializer of ``W`` (shape ``(F, 1)``).
        bias_initializer: initializer of ``b``.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Input shape:
        ``(batch_size, time_steps, features)``, with an optional Keras mask
        ``(batch_size, time_steps)``.

    Output shape:
        ``(batch_size, features)``.

    Example:

    >>> layer = AttentionPooling()
    >>> layer(keras.ops.ones((2, 7, 16))).shape
    TensorShape([2, 16])
    """

    def __init__(
        self,
        per_step_bias=False,
        kernel_initializer="random_normal",
        bias_initializer="zeros",
        *,
        implementation=None,
        **kwargs,
    ):
        if not isinstance(per_step_bias, bool):
            raise ValueError(
                "Received an invalid value for `per_step_bias`, expected a bool. "
                f"Received: per_step_bias={per_step_bias!r}"
            )
        super().__init__(implementation=implementation, **kwargs)
        self.per_step_bias = per_step_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=3)
        self.supports_masking = True

    def build(self, input_shape):
        time_steps, features = input_shape[1], input_shape[2]
        if self.per_step_bias and time_steps is None:
            raise ValueError(
                "`per_step_bias=True` needs a fixed number of time steps, one bias per "
                f"step. Received: input_shape={tuple(input_shape)}"
            )
        self.attention_weight = self.add_weight(
            name="attention_weight", shape=(features, 1), initializer=self.kernel_initializer
        )
        self.attention_bias = self.add_weight(
            name="attention_bias",
            shape=(time_steps, 1) if self.per_step_bias else (1,),
            initializer=self.bias_initializer,
        )
        axes = {-1: features}
        if self.per_step_bias:
            axes[1] = time_steps
        self.input_spec = keras.layers.InputSpec(ndim=3, axes=axes)

    def call(self, inputs, mask=None):
        if mask is not None:
            mask = keras.ops.cast(mask, "bool")
        return kernels.attention_pooling(
            inputs,
            self.attention_weight,
            self.attention_bias,
            mask,
            implementation=self.implementation,
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def compute_mask(self, inputs, mask=None):
        # The time axis is pooled away, and with it the mask.
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "per_step_bias": self.per_step_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
