"""Dense: a drop-in for ``keras.layers.Dense`` with a fused matmul epilogue."""

from __future__ import annotations

import keras

from fastlayers import kernels
from fastlayers.layers.base import FastLayer, check_positive_int, get_activation, register


@register
class Dense(FastLayer):
    """Just your regular densely-connected layer, fast: ``activation(inputs · kernel + bias)``.

    Takes the constructor arguments, call signature, weights (``kernel`` then
    ``bias``), masking and errors of ``keras.layers.Dense``, so
    ``ours.set_weights(keras_dense.get_weights())`` reproduces Keras's outputs. The
    compiled paths run the matmul, bias and activation as one fused kernel; matmuls
    accumulate in float32 under every dtype policy. LoRA and quantization are not
    supported: use ``keras.layers.Dense`` for those.

    Args:
        units: positive integer, dimensionality of the output space.
        activation: activation function (name or callable); None means linear.
        use_bias: whether the layer uses a bias vector.
        kernel_initializer: initializer for the ``kernel`` weights matrix.
        bias_initializer: initializer for the bias vector.
        kernel_regularizer: regularizer applied to the ``kernel`` weights matrix.
        bias_regularizer: regularizer applied to the bias vector.
        activity_regularizer: regularizer applied to the output of the layer.
        kernel_constraint: constraint applied to the ``kernel`` weights matrix.
        bias_constraint: constraint applied to the bias vector.
        implementation: None (auto: the fastest for the device and dtype),
            ``"reference"``, ``"graph"`` or ``"xla"``.

    Input shape:
        N-D tensor with shape ``(batch_size, ..., input_dim)``.

    Output shape:
        N-D tensor with shape ``(batch_size, ..., units)``.

    Example:

    >>> from fastlayers import layers
    >>> layer = layers.Dense(64, activation="relu")
    >>> layer(keras.ops.ones((8, 16))).shape
    TensorShape([8, 64])
    """

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        implementation=None,
        **kwargs,
    ):
        units = check_positive_int("units", units)
        for name, value in (
            ("lora_rank", lora_rank),
            ("lora_alpha", lora_alpha),
            ("quantization_config", quantization_config),
        ):
            if value is not None:
                raise ValueError(
                    f"fastlayers.layers.Dense does not support LoRA or quantization; "
                    f"use keras.layers.Dense for `{name}`. Received: {name}={value!r}"
                )
        super().__init__(
            implementation=implementation,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.units = units
        self.activation = get_activation(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

    def call(self, inputs, training=None):
        return kernels.dense(
            inputs,
            self.kernel,
            self.bias,
            activation=self.activation,
            implementation=self.implementation,
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.units,)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
        }
