"""The native int8 Dense (``dense_int8.cc``) behind ``kernels.dense_int8``'s signature.

Shape letters as in ``fastlayers.kernels.dense``: ``x [..., K]``, ``kernel_q [K, N]``
int8, ``kernel_scale [N]``, ``bias [N]``, output ``[..., N]``; ``M`` is the product of
the leading axes of ``x``.

The op quantizes each row of ``x`` as Keras does, multiplies by the int8 kernel with
exact int32 sums, and dequantizes, adds the bias and applies a ReLU in one pass: the
outputs are bit-equal to Keras's int8 Dense in float32. It packs the kernel once into
int8 panels and keeps the packed form (a kernel assigned since is packed again; see
the source). Its gradient with respect to ``x`` is Keras's straight-through one,
``dy · (kernel_q / kernel_scale)ᵀ``, and the bias has its usual one; the int8 kernel
and its scales get none, as in Keras.

Dispatch runs it as ``NATIVE`` (``Kernel(native=...)``): CPU and float32 only;
dispatch refuses it inside an XLA cluster and asks ``not_built_reason`` whether the
op builds (it is built with the attention op, one library).
"""

from __future__ import annotations

import tensorflow as tf
from fastlayers.kernels.native import build as build_lib


@tf.autograph.experimental.do_not_convert
def load_library():
    """The op library, built on first use (``build.load_once``). Raises
    ``build.BuildError``; a failure is remembered for the process."""
    return build_lib.load_once()


@tf.autograph.experimental.do_not_convert
def isa() -> str:
    """The instruction set the int8 op runs on this CPU: ``"avx512vnni"``, ``"avx2"``
    or ``"portable"``.
    Raises ``build.BuildError`` when the op does not build."""
    library = load_library()
    with tf.init_scope():
        return library.fastlayers_dense_int8_isa().numpy().decode()


@tf.autograph.experimental.do_not_convert
def cached_kernels() -> int:
    """How many packed kernels the op keeps in this process."""
    library = load_library()
    with tf.init_scope():
        return int(library.fastlayers_dense_int8_cached_kernels().numpy())


@tf.autograph.experimental.do_not_convert
def not_supported_reasons(*, platform, dtype):
    """Why the native op cannot take a call for its platform and dtype; empty when it
    can. Whether it builds is ``not_built_reason``'s, asked after this."""
    reasons = []
    if platform == "gpu":
        reasons.append("the native int8 kernel runs on CPU only")
    if tf.as_dtype(dtype) != tf.float32:
        reasons.append(
            f"the native int8 kernel takes float32 inputs, not {tf.as_dtype(dtype).name} "
            "(Keras quantizes other dtypes in their own precision)"
        )
    return reasons


@tf.autograph.experimental.do_not_convert
def not_built_reason() -> str | None:
    """Why the op cannot run in this process, or None once it is loaded; the first
    call builds it, and a failure warns once (``build.not_built_reason``)."""
    return build_lib.not_built_reason("the native int8 Dense kernel")


def _fused_activation(activation) -> str | None:
    """The op's ``activation`` attribute for ``activation``, or None when the op
    cannot apply it (it then runs after the op)."""
    if activation is None or activation is tf.identity:
        return "linear"
    if activation is tf.nn.relu:
        return "relu"
    # Keras's functions by name: its relu with default arguments is TensorFlow's Relu.
    name = getattr(activation, "__name__", None)
    if getattr(activation, "__module__", "").startswith("keras.") and name in ("linear", "relu"):
        return name
    return None


class NativeDenseInt8:
    """The ``"native"`` implementation of ``dense_int8`` as dispatch runs it."""

    def __call__(self, x, kernel_q, kernel_scale, bias=None, *, epsilon, activation=None):
        return dense_int8_native(
            x, kernel_q, kernel_scale, bias, epsilon=epsilon, activation=activation
        )

    def not_built_reason(self) -> str | None:
        """See the module's ``not_built_reason``."""
        return not_built_reason()


NATIVE = NativeDenseInt8()


def dense_int8_native(x, kernel_q, kernel_scale, bias=None, *, epsilon, activation=None, isa="best"):
    """The native op with ``kernels.dense_int8_reference``'s semantics (float32).

    ``isa`` names the primitives to run (``"avx512vnni"``, ``"avx2"``, ``"portable"``)
    instead of the best this CPU has (tests compare them); one the CPU cannot run
    raises ``tf.errors.InvalidArgumentError``.
    """
    library = load_library()
    x, kernel_q, kernel_scale = (tf.convert_to_tensor(t) for t in (x, kernel_q, kernel_scale))
    bias = None if bias is None else tf.convert_to_tensor(bias)
    fused = _fused_activation(activation)
    features, units = kernel_q.shape[0], kernel_q.shape[1]
    units_size = units if units is not None else tf.shape(kernel_q)[1]
    if x.shape.rank == 2:
        rows = x
    else:
        # M counted, not inferred with -1: with K = 0 a [-1, 0] reshape cannot know M.
        features = features if features is not None else tf.shape(kernel_q)[0]
        rows = tf.reshape(x, tf.stack([tf.reduce_prod(tf.shape(x)[:-1]), features]))
    bias_in = tf.zeros([0], tf.float32) if bias is None else tf.cast(bias, tf.float32)
    scale = tf.cast(kernel_scale, tf.float32)

    @tf.custom_gradient
    def product(rows, bias_in):
        y = library.fastlayers_dense_int8(
            rows, kernel_q, scale, bias_in,
            epsilon=float(epsilon), activation=fused or "linear", has_bias=bias is not None, isa=isa,
        )

        def grad(dy):
            if fused == "relu":
                dy = tf.where(y > 0, dy, tf.zeros_like(dy))
            dequantized = tf.cast(kernel_q, dy.dtype) / scale
            d_bias = tf.reduce_sum(dy, axis=0) if bias is not None else tf.zeros_like(bias_in)
            return tf.matmul(dy, dequantized, transpose_b=True), d_bias

        return y, grad

    y = product(rows, bias_in)
    if x.shape.rank != 2:
        y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [units_size]], axis=0))
        y.set_shape(x.shape[:-1].concatenate([units]))
    if fused is None:
        y = activation(y)
    return y
