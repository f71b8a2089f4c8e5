"""Dense: a drop-in for ``keras.layers.Dense`` with a fused matmul epilogue."""

from __future__ import annotations

import keras
import tensorflow as tf

from fastlayers import kernels
from fastlayers.kernels import dispatch
from fastlayers.layers.base import KerasQuantization, check_positive_int, get_activation, register


@register
class Dense(KerasQuantization, keras.layers.Dense):
    """Just your regular densely-connected layer, fast: ``activation(inputs · kernel + bias)``.

    A subclass of ``keras.layers.Dense`` (Keras 3.15) that replaces only its float
    computation: constructor arguments, call signature, weights (``kernel`` then
    ``bias``), masking, errors, LoRA (``lora_rank``, ``lora_alpha``,
    ``enable_lora``), quantization (``quantize("int8" | "int4" | "float8" | "gptq" |
    "awq")``), sparse inputs, constraints, regularizers and serialization are Keras's,
    so ``ours.set_weights(keras_dense.get_weights())`` reproduces Keras's outputs.

    Float calls run ``kernels.dense``: the matmul, bias and activation as one fused
    kernel, with float32 accumulation under every dtype policy. With LoRA enabled the
    low-rank update is a second, rank-R product inside that kernel, added before the
    bias and activation; the merged kernel is never formed, and the frozen kernel
    is constant to autodiff (a gradient asked for it is None, where Keras's would
    come through the merged kernel), so a training step has no ``[K, N]``
    weight-gradient product. After ``quantize("int8")`` with Keras's default scheme
    (per-row abs-max int8 inputs), calls run ``kernels.dense_int8``: the same saved
    int8 kernel and scales, the same outputs, in one fused kernel (on CPU in float32
    a native op with exact int32 sums, bit-equal to Keras's; else an int8 product
    under XLA). Other quantization modes run Keras's computation. ``not_supported_reasons(inputs)`` (and, when int8-quantized,
    ``int8_not_supported_reasons(inputs)``) say why a call runs Keras's computation
    instead; with an explicit ``implementation`` such a call raises a ValueError
    naming them.

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
        lora_rank: optional rank of a LoRA update, enabled when the layer is built.
        lora_alpha: optional LoRA scale numerator (the update is scaled by
            ``lora_alpha / lora_rank``); defaults to ``lora_rank``.
        quantization_config: optional Keras quantization config, as for
            ``keras.layers.Dense``.
        implementation: None (auto: the fastest for the device and dtype),
            ``"reference"``, ``"graph"``, ``"xla"`` or ``"native"`` (the int8
            kernel's, once quantized; the float kernel has none). Kept in
            ``get_config()``.

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

    def __init__(self, units, activation=None, *args, implementation=None, **kwargs):
        # Checked before Keras's own checks: these errors name the value received.
        units = check_positive_int("units", units)
        get_activation(activation)
        super().__init__(units, activation, *args, **kwargs)
        self.implementation = dispatch.check_implementation(implementation)

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}

    def not_supported_reasons(self, inputs) -> list[str]:
        """Why the fused kernel cannot take ``inputs``; empty when it can.

        A quantized layer runs Keras's quantized computation (``quantized_call``),
        which does not come here.
        """
        reasons = []
        if isinstance(inputs, tf.SparseTensor):
            reasons.append("sparse inputs: the fused kernel takes dense tensors")
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if not keras.backend.is_float_dtype(dtype):
            reasons.append(f"inputs of dtype {dtype}: the fused kernel takes floating inputs")
        elif dtype != self.compute_dtype:
            reasons.append(
                f"inputs of dtype {dtype} with compute dtype {self.compute_dtype}: the fused "
                "kernel takes one dtype"
            )
        return reasons

    def call(self, inputs, training=None):
        reasons = self.not_supported_reasons(inputs)
        if reasons:
            if self.implementation is not None:
                raise ValueError(
                    f"implementation={self.implementation!r} cannot run {type(self).__name__} "
                    "on this call: " + "; ".join(reasons)
                )
            return super().call(inputs, training=training)
        lora = {}
        if self.lora_enabled:
            lora = {
                "lora_a": self._in_compute_dtype(self.lora_kernel_a),
                "lora_b": self._in_compute_dtype(self.lora_kernel_b),
                "lora_scale": self.lora_alpha / self.lora_rank,
            }
        return kernels.dense(
            inputs,
            self._in_compute_dtype(self._kernel),
            None if self.bias is None else self._in_compute_dtype(self.bias),
            # LoRA's frozen kernel is constant to autodiff: no [K, N] gradient product.
            freeze_kernel=self.lora_enabled and not self._kernel.trainable,
            activation=self.activation,
            implementation=self.implementation,
            **lora,
        )

    def _int8_call(self, inputs, training=None):
        reasons = self.int8_not_supported_reasons(inputs)
        if reasons:
            if self.implementation is not None:
                raise ValueError(
                    f"implementation={self.implementation!r} cannot run the int8 "
                    f"{type(self).__name__} on this call: " + "; ".join(reasons)
                )
            return super()._int8_call(inputs, training=training)
        return kernels.dense_int8(
            inputs,
            keras.ops.convert_to_tensor(self._kernel),
            self._in_compute_dtype(self.kernel_scale),
            None if self.bias is None else self._in_compute_dtype(self.bias),
            epsilon=self.inputs_quantizer.epsilon,
            activation=self.activation,
            implementation=self.implementation,
        )

    def int8_not_supported_reasons(self, inputs) -> list[str]:
        """Why the fused int8 kernel cannot take ``inputs`` on this int8-quantized
        layer; empty when it can. It runs Keras's default int8 scheme: per-row abs-max
        int8 inputs, no LoRA."""
        reasons = self.not_supported_reasons(inputs)
        quantizer = self.inputs_quantizer
        if not (
            isinstance(quantizer, keras.quantizers.AbsMaxQuantizer)
            and tuple(quantizer.value_range) == (-127, 127)
            and quantizer.axis in (None, -1, (-1,), [-1])
            and keras.backend.standardize_dtype(quantizer.output_dtype) == "int8"
        ):
            reasons.append(
                f"inputs quantizer {quantizer!r}: the int8 kernel quantizes each input row "
                "to [-127, 127] by its abs-max, Keras's default"
            )
        if self.lora_enabled:
            reasons.append("LoRA on an int8 kernel runs Keras's computation")
        return reasons

    def _in_compute_dtype(self, variable):
        # Variables read inside `__call__` are autocast to the compute dtype, except
        # where autocasting is off (a layer with `autocast=False`).
        return keras.ops.cast(variable, self.compute_dtype)
