"""EinsumDense: a drop-in for ``keras.layers.EinsumDense`` whose int8 form runs the
fused int8 Dense kernel where its equation is a plain matmul."""

from __future__ import annotations

import math
import types

import keras
import tensorflow as tf

from fastlayers import kernels
from fastlayers.kernels import dispatch
from fastlayers.layers.base import KerasQuantization, register


def matmul_split(equation: str):
    """``(batch, contracted, free)`` axis letters of an einsum equation that is a
    plain matmul, or None: ``input = batch + contracted``, ``kernel = contracted +
    free``, ``output = batch + free`` (``"abc,cde->abde"``: ``"ab"``, ``"c"``,
    ``"de"``), every letter once."""
    equation = equation.replace(" ", "")
    if "..." in equation or equation.count(",") != 1 or equation.count("->") != 1:
        return None
    operands, output = equation.split("->")
    source, kernel = operands.split(",")
    letters = source + kernel + output
    if len(set(source)) != len(source) or len(set(kernel)) != len(kernel) or len(set(output)) != len(output):
        return None
    contracted = "".join(c for c in source if c in kernel and c not in output)
    batch = source[: len(source) - len(contracted)]
    free = kernel[len(contracted):]
    if not contracted or not letters.isalpha():
        return None
    if source != batch + contracted or kernel != contracted + free or output != batch + free:
        return None
    return batch, contracted, free


@register
class EinsumDense(KerasQuantization, keras.layers.EinsumDense):
    """A layer that uses ``einsum`` as the backing computation, fast when int8-quantized.

    A subclass of ``keras.layers.EinsumDense`` (Keras 3.15): constructor arguments,
    weights, LoRA, every quantization mode and serialization are Keras's. After
    ``quantize("int8")`` with Keras's default scheme, an equation that is a plain
    matmul (``input = batch + contracted`` axes, ``kernel = contracted + free``,
    ``output = batch + free``, such as attention's projections ``"abc,cde->abde"``
    and ``"abcd,cde->abe"``) runs ``kernels.dense_int8`` on the flattened
    ``[M, K]`` rows and ``[K, N]`` kernel: Keras's quantization of the contracted
    axes, its int8 kernel and scales, the same outputs. Other equations and calls run
    Keras's computation; ``int8_not_supported_reasons(inputs)`` says why.
    Float calls are Keras's.

    Args:
        *args: the positional arguments of ``keras.layers.EinsumDense``
            (``equation``, ``output_shape``, ``activation``, ``bias_axes``, ...).
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"``: the implementation of the int8 kernel. Kept in
            ``get_config()``.
        **kwargs: the keyword arguments of ``keras.layers.EinsumDense``.

    Example:

    >>> layer = EinsumDense("abc,cde->abde", output_shape=(None, 4, 8), bias_axes="de")
    >>> layer.build((None, 5, 16))
    >>> layer.quantize("int8")
    >>> layer(keras.ops.ones((2, 5, 16))).shape
    TensorShape([2, 5, 4, 8])
    """

    # A class attribute, so that Keras's own EinsumDense sublayers of the attention
    # layers can take this class after they are built (``adopt``).
    implementation = None

    def __init__(self, *args, implementation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.implementation = dispatch.check_implementation(implementation)

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}

    def int8_not_supported_reasons(self, inputs) -> list[str]:
        """Why the fused int8 kernel cannot take ``inputs`` on this int8-quantized
        layer; empty when it can."""
        reasons = []
        split = matmul_split(self.equation)
        if split is None:
            return [
                f"equation {self.equation!r} is not a plain matmul "
                "(input = batch + contracted axes, kernel = contracted + free, "
                "output = batch + free)"
            ]
        batch, contracted, free = split
        if isinstance(inputs, tf.SparseTensor):
            reasons.append("sparse inputs: the int8 kernel takes dense tensors")
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if dtype != self.compute_dtype:
            reasons.append(
                f"inputs of dtype {dtype} with compute dtype {self.compute_dtype}: the int8 "
                "kernel takes one floating dtype"
            )
        quantizer = self.inputs_quantizer
        reduced = tuple(range(len(batch), len(batch) + len(contracted)))
        if not (
            isinstance(quantizer, keras.quantizers.AbsMaxQuantizer)
            and tuple(quantizer.value_range) == (-127, 127)
            and tuple(self.quantization_axis) == reduced
            and keras.backend.standardize_dtype(quantizer.output_dtype) == "int8"
        ):
            reasons.append(
                f"inputs quantizer {quantizer!r}: the int8 kernel quantizes each input row "
                "to [-127, 127] by its abs-max over the contracted axes, Keras's default"
            )
        free_shape = tuple(self._kernel.shape[len(contracted):])
        if tuple(self.kernel_scale.shape) != (1,) * len(batch) + free_shape:
            reasons.append(
                f"kernel_scale of shape {tuple(self.kernel_scale.shape)}: the int8 kernel takes "
                "one scale per output unit"
            )
        if self.bias is not None and len(self.bias.shape) > len(free):
            reasons.append(f"bias axes {self.bias_axes!r} include batch axes of the output")
        if self.lora_enabled:
            reasons.append("LoRA on an int8 kernel runs Keras's computation")
        return reasons

    def _int8_call(self, inputs, training=None):
        reasons = self.int8_not_supported_reasons(inputs)
        if reasons:
            if self.implementation is not None:
                raise ValueError(
                    f"implementation={self.implementation!r} cannot run the int8 "
                    f"{type(self).__name__} on this call: " + "; ".join(reasons)
                )
            return super()._int8_call(inputs, training=training)
        batch, contracted, free = matmul_split(self.equation)
        kernel_shape = tuple(self._kernel.shape)
        features = math.prod(kernel_shape[: len(contracted)])
        free_shape = kernel_shape[len(contracted):]
        units = math.prod(free_shape)
        x = tf.convert_to_tensor(inputs)
        rows = tf.reshape(x, tf.concat([tf.shape(x)[: len(batch)], [features]], axis=0))
        bias = None
        if self.bias is not None:
            bias = tf.reshape(tf.broadcast_to(keras.ops.cast(self.bias, self.compute_dtype), free_shape), [units])
        y = kernels.dense_int8(
            rows,
            tf.reshape(keras.ops.convert_to_tensor(self._kernel), [features, units]),
            tf.reshape(keras.ops.cast(self.kernel_scale, self.compute_dtype), [units]),
            bias,
            epsilon=self.inputs_quantizer.epsilon,
            implementation=self.implementation,
        )
        y = tf.reshape(y, tf.concat([tf.shape(x)[: len(batch)], free_shape], axis=0))
        if self.activation is not None:
            y = self.activation(y)
        return y


class Int8Projections:
    """Mixin of the attention layers: once built, Keras's ``EinsumDense`` projections
    take this module's class (``adopt``), so that quantized to int8 they run the fused
    int8 kernel."""

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        adopt(self)


def adopt(layer):
    """Gives every ``keras.layers.EinsumDense`` directly under ``layer`` (the
    projections of an attention layer, once built) this module's class, so that
    their int8 form runs the fused kernel. Their weights, state and Keras's
    computation elsewhere are untouched."""
    for sublayer in layer._flatten_layers(include_self=False, recursive=False):
        if type(sublayer) is keras.layers.EinsumDense and _rebind_quantize(sublayer):
            sublayer.__class__ = EinsumDense


def _rebind_quantize(sublayer) -> bool:
    # Keras wraps each instance's `quantize` when the instance is made (tracker
    # unlocking, config resolution) around the class's method as bound then: the
    # wrapper must call ours, whose subclass check accepts this class. Where Keras's
    # wrapper is not the one this code knows, the sublayer keeps Keras's class.
    wrapper = sublayer.__dict__.get("quantize")
    closure = getattr(wrapper, "__closure__", None) or ()
    cells = dict(zip(getattr(getattr(wrapper, "__code__", None), "co_freevars", ()), closure))
    cell = cells.get("original_quantize_method")
    if cell is None:
        return False
    cell.cell_contents = types.MethodType(EinsumDense.quantize, sublayer)
    return True
