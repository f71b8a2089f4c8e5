"""Dense: ``activation(x · kernel + bias)``.

Shape letters: ``x [..., K]``, ``kernel [K, N]``, ``bias [N]``, output ``[..., N]``;
``M`` is the product of the leading axes of ``x`` (the rows of the matmul). A LoRA
update (``lora_a [K, R]``, ``lora_b [R, N]``, rank ``R``) adds
``lora_scale · (x · lora_a) · lora_b`` before the bias and activation.
"""

from __future__ import annotations

import numbers

import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels import platform as platform_lib
from fastlayers.kernels.auto import AUTO
from fastlayers.kernels.native import dense_int8 as native_dense_int8
from fastlayers.kernels.precision import LOW_PRECISION_DTYPES, accumulation_dtype
from fastlayers.kernels.validation import check_floating, check_same_dtype


def dense_reference(
    x, kernel, bias=None, lora_a=None, lora_b=None, *, lora_scale=1.0, freeze_kernel=False, activation=None
):
    """The spec: contract in the accumulation dtype, add the LoRA update and bias,
    activate, cast back."""
    if freeze_kernel:
        kernel = tf.stop_gradient(kernel)
    acc = accumulation_dtype(x.dtype)
    y = tf.tensordot(tf.cast(x, acc), tf.cast(kernel, acc), axes=1)  # [..., K]·[K, N]
    if lora_a is not None:
        low_rank = tf.tensordot(tf.cast(x, acc), tf.cast(lora_a, acc), axes=1)  # [..., R]
        y = y + lora_scale * tf.tensordot(low_rank, tf.cast(lora_b, acc), axes=1)
    if bias is not None:
        y = y + tf.cast(bias, acc)
    if activation is not None:
        y = activation(y)
    return tf.cast(y, x.dtype)


def _acts_on_last_axis_only(activation) -> bool:
    # Keras's built-in activations are elementwise or act on the last axis (softmax),
    # so they may run on the [M, N] matmul output, where grappler fuses them into the
    # matmul's epilogue. A user's function may look at other axes: it gets [..., N].
    return getattr(activation, "__module__", "").startswith("keras.")


def _size(tensor, axis):
    # reduce_retracing may relax static sizes to None: fall back on the dynamic one
    static = tensor.shape[axis]
    return static if static is not None else tf.shape(tensor)[axis]


def rows_matmul(x, kernel):
    """``x [..., K]`` as ``[M, K]`` rows times ``kernel [K, N]``: ``[M, N]``.

    Float16/bfloat16 operands are cast to float32 first unless the platform's matmul
    accumulates them in float32 natively; the result is in the operand dtype.
    """
    native = dispatch.native_low_precision_matmul(dispatch.platform_of(x), x.dtype)
    operand_dtype = x.dtype if native else accumulation_dtype(x.dtype)
    rows = x if x.shape.rank == 2 else tf.reshape(x, [-1, _size(kernel, 0)])
    if kernel.shape[0] == 0:
        # An empty contraction is zeros; as a MatMul, grappler would fuse it with a
        # following BiasAdd into a _FusedMatMul, which returns zeros without the bias
        # when K = 0 (see ``dense_compiled`` for a K unknown when traced).
        return tf.zeros(tf.stack([tf.shape(rows)[0], _size(kernel, 1)]), operand_dtype)
    return tf.matmul(tf.cast(rows, operand_dtype), tf.cast(kernel, operand_dtype))


def unflatten_rows(y, x, kernel):
    """``y [M, N]`` from ``rows_matmul(x, kernel)`` back to ``[..., N]``."""
    if x.shape.rank == 2:
        return y
    y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [_size(kernel, 1)]], axis=0))
    y.set_shape(x.shape[:-1].concatenate([kernel.shape[1]]))
    return y


@tf.RegisterGradient("FastlayersBiasAdd")
def _bias_add_grad(op, grad):
    """BiasAdd's gradient with the bias term summed in float32 (TensorFlow's
    ``BiasAddGrad`` sums half-precision gradients in their own dtype)."""
    acc = accumulation_dtype(grad.dtype)
    rows = tf.reshape(tf.cast(grad, acc), [-1, tf.shape(grad)[-1]])
    return grad, tf.cast(tf.reduce_sum(rows, axis=0), op.inputs[1].dtype)


def _bias_add(y, bias):
    """``tf.nn.bias_add``, the op grappler fuses into the matmul, with the float32 bias
    gradient above where ``y`` has half precision (in graphs: eager ops keep theirs)."""
    if y.dtype not in LOW_PRECISION_DTYPES or tf.executing_eagerly():
        return tf.nn.bias_add(y, bias)
    with tf.compat.v1.get_default_graph().gradient_override_map({"BiasAdd": "FastlayersBiasAdd"}):
        return tf.nn.bias_add(y, bias)


def dense_compiled(
    x, kernel, bias=None, lora_a=None, lora_b=None, *, lora_scale=1.0, freeze_kernel=False, activation=None
):
    """The graph/XLA algorithm: one 2-D MatMul → BiasAdd → activation chain.

    That chain is the pattern grappler's remapper fuses into a single ``_FusedMatMul``
    (oneDNN or Eigen on CPU, cuBLASLt on GPU), and XLA fuses the epilogue into one
    loop. Operands are widened as ``rows_matmul`` says. A LoRA update is a second,
    rank-R product added before the epilogue: the merged kernel ``kernel + A·B`` is
    never formed. A frozen kernel is cut from autodiff inside the function: a
    compiled function's gradient returns one for every input, and only a gradient
    that is never formed spares its ``[K, N]`` weight-gradient product.
    """
    if freeze_kernel:
        kernel = tf.stop_gradient(kernel)
    y = rows_matmul(x, kernel)  # [M, N]
    if lora_a is not None:
        low_rank = rows_matmul(x, lora_a)  # [M, R]
        update = tf.matmul(low_rank, tf.cast(lora_b, low_rank.dtype))  # [M, N]
        y = y + tf.cast(lora_scale, y.dtype) * tf.cast(update, y.dtype)
    if bias is not None:
        y = _bias_add(y, tf.cast(bias, y.dtype))
        if kernel.shape[0] is None:
            # A trace shared across kernel shapes may meet K = 0 (``rows_matmul``).
            empty = tf.equal(tf.shape(kernel)[0], 0)
            y = tf.where(empty, tf.broadcast_to(tf.cast(bias, y.dtype), tf.shape(y)), y)
    fuse_activation = activation is not None and _acts_on_last_axis_only(activation)
    if fuse_activation:
        y = activation(y)
    y = unflatten_rows(y, x, kernel)
    if activation is not None and not fuse_activation:
        y = activation(y)
    return tf.cast(y, x.dtype)


def _work(x, kernel, bias=None, lora_a=None, lora_b=None, **options):
    if not (x.shape.is_fully_defined() and kernel.shape.is_fully_defined()):
        return None
    rows = x.shape[:-1].num_elements()
    work = flops_lib.dense_flops(rows, *kernel.shape)
    if lora_a is not None:
        rank = lora_a.shape[1]
        work += flops_lib.dense_flops(rows, kernel.shape[0], rank)
        work += flops_lib.dense_flops(rows, rank, kernel.shape[1])
    return work


def _auto_row(**_):
    # A training step's choice differs from a forward call's (kernels/auto.py).
    return "training" if platform_lib.gradient_recording() else None


DENSE = dispatch.Kernel(
    "dense", dense_reference, dense_compiled, auto=AUTO["dense"], work=_work, auto_row=_auto_row
)


def _check_shapes(x, kernel, bias):
    dtype = check_floating("x", x)
    if x.shape.rank is not None and x.shape.rank < 2:
        raise ValueError(
            "`x` must have rank 2 or more ([..., K]). "
            f"Received: x.shape={tuple(x.shape)}"
        )
    if kernel.shape.rank != 2:
        raise ValueError(
            f"`kernel` must have rank 2 ([K, N]). Received: kernel.shape={tuple(kernel.shape)}"
        )
    features = x.shape[-1]
    if features is not None and kernel.shape[0] is not None and features != kernel.shape[0]:
        raise ValueError(
            f"The last axis of `x` ({features}) must equal the first axis of `kernel` "
            f"({kernel.shape[0]}). Received: x.shape={tuple(x.shape)}, "
            f"kernel.shape={tuple(kernel.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (kernel.shape[1],):
        raise ValueError(
            f"`bias` must have shape ({kernel.shape[1]},), one value per unit. "
            f"Received: bias.shape={tuple(bias.shape)}"
        )
    return dtype


def _check_dense_inputs(x, kernel, bias, lora_a, lora_b, lora_scale):
    dtype = _check_shapes(x, kernel, bias)
    check_same_dtype("x", dtype, kernel=kernel, bias=bias)
    if (lora_a is None) != (lora_b is None):
        raise ValueError(
            "`lora_a` and `lora_b` go together: pass both or neither. "
            f"Received: lora_a={_shape_or_none(lora_a)}, lora_b={_shape_or_none(lora_b)}"
        )
    if lora_a is None:
        return
    if (
        lora_a.shape.rank != 2
        or lora_b.shape.rank != 2
        or lora_a.shape[0] != kernel.shape[0]
        or lora_b.shape[1] != kernel.shape[1]
        or lora_a.shape[1] != lora_b.shape[0]
    ):
        raise ValueError(
            "`lora_a` must have shape [K, R] and `lora_b` shape [R, N] for "
            f"kernel.shape={tuple(kernel.shape)} = [K, N]. Received: "
            f"lora_a.shape={tuple(lora_a.shape)}, lora_b.shape={tuple(lora_b.shape)}"
        )
    check_same_dtype("x", dtype, lora_a=lora_a, lora_b=lora_b)
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real):
        raise ValueError(
            "Received an invalid value for `lora_scale`, expected a number. "
            f"Received: lora_scale={lora_scale!r}"
        )


def _shape_or_none(t):
    return None if t is None else f"<tensor of shape {tuple(t.shape)}>"


def dense(
    x,
    kernel,
    bias=None,
    *,
    lora_a=None,
    lora_b=None,
    lora_scale=1.0,
    freeze_kernel=False,
    activation=None,
    implementation=None,
):
    """``activation(x · kernel + lora_scale · (x · lora_a) · lora_b + bias)`` with
    float32 accumulation.

    Args:
        x: ``[..., K]`` floating tensor.
        kernel: ``[K, N]`` tensor of the dtype of ``x``.
        bias: optional ``[N]`` tensor of the dtype of ``x``.
        lora_a: optional ``[K, R]`` tensor of the dtype of ``x``, the down
            projection of a LoRA update; needs ``lora_b``.
        lora_b: optional ``[R, N]`` tensor of the dtype of ``x``, its up projection.
        lora_scale: multiplier of the LoRA update (Keras's ``lora_alpha / lora_rank``).
        freeze_kernel: whether ``kernel`` is constant to autodiff (the frozen kernel
            of a LoRA-adapted layer): its gradient is zero and never computed.
        activation: optional callable applied to the pre-activation.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Returns:
        ``[..., N]`` tensor of the dtype of ``x``.
    """
    dispatch.check_implementation(implementation)
    x = tf.convert_to_tensor(x)
    kernel = tf.convert_to_tensor(kernel)
    bias, lora_a, lora_b = (None if t is None else tf.convert_to_tensor(t) for t in (bias, lora_a, lora_b))
    _check_dense_inputs(x, kernel, bias, lora_a, lora_b, lora_scale)
    options = {"activation": activation}
    if freeze_kernel:
        options["freeze_kernel"] = True
    if lora_a is None:
        return DENSE(x, kernel, bias, implementation=implementation, **options)
    return DENSE(
        x, kernel, bias, lora_a, lora_b, implementation=implementation, lora_scale=float(lora_scale), **options
    )


# ---------------------------------------------------------------------------------
# int8: Keras's quantized Dense (``Dense.quantize("int8")``), fused.
#
# Keras's semantics, kept exactly: the kernel is int8 ``[K, N]`` with one float scale
# per unit (``kernel ≈ kernel_q / kernel_scale``); each row of ``x`` is quantized
# symmetrically, ``x_q = clip(round(x · s), -127, 127)`` with
# ``s = 127 / (max |x_row| + epsilon)``; the int8 product accumulates in int32 and
# is divided by ``kernel_scale · s``. The gradient with respect to ``x`` is Keras's
# straight-through one: ``dy · (kernel_q / kernel_scale)ᵀ``.

INT8_RANGE = 127.0


def _quantized_matmul(x, kernel_q, kernel_scale, epsilon):
    """``x [M, K]`` (float) times int8 ``kernel_q [K, N]``, dequantized: ``[M, N]``."""

    @tf.custom_gradient
    def product(x):
        acc = accumulation_dtype(x.dtype)
        x_acc = tf.cast(x, acc)
        # Keras computes the scale in the input dtype and quantizes x · scale in it.
        scale = tf.cast(
            INT8_RANGE / (tf.reduce_max(tf.abs(x_acc), axis=-1, keepdims=True) + epsilon), x.dtype
        )
        x_q = tf.cast(tf.clip_by_value(tf.round(x * scale), -INT8_RANGE, INT8_RANGE), tf.int8)
        y = tf.cast(tf.linalg.matmul(x_q, kernel_q, output_type=tf.int32), x.dtype)
        y = y / (tf.cast(kernel_scale, x.dtype) * scale)

        def grad(dy):
            dequantized = tf.cast(kernel_q, dy.dtype) / tf.cast(kernel_scale, dy.dtype)
            return tf.matmul(dy, dequantized, transpose_b=True)

        return y, grad

    return product(x)


def _int8_rows(x, kernel_q):
    # M counted, not inferred with -1: with K = 0 a [-1, 0] reshape cannot know M.
    rows = tf.reduce_prod(tf.shape(x)[:-1])
    return tf.reshape(x, tf.stack([rows, _size(kernel_q, 0)]))


def dense_int8_reference(x, kernel_q, kernel_scale, bias=None, *, epsilon, activation=None):
    """The spec: Keras's int8 Dense, op by op, on the ``[M, K]`` rows of ``x``."""
    rows = _int8_rows(x, kernel_q)
    y = _quantized_matmul(rows, kernel_q, kernel_scale, epsilon)
    if bias is not None:
        y = y + bias
    y = unflatten_rows(y, x, kernel_q)
    if activation is not None:
        y = activation(y)
    return y


def dense_int8_compiled(x, kernel_q, kernel_scale, bias=None, *, epsilon, activation=None):
    """The graph/XLA algorithm: the reference's ops, which XLA fuses into a row
    quantization pass, an int8 dot and one dequantize-bias-activation epilogue."""
    rows = x if x.shape.rank == 2 else _int8_rows(x, kernel_q)
    y = _quantized_matmul(rows, kernel_q, kernel_scale, epsilon)
    if bias is not None:
        y = tf.nn.bias_add(y, bias)
    fuse_activation = activation is not None and _acts_on_last_axis_only(activation)
    if fuse_activation:
        y = activation(y)
    y = unflatten_rows(y, x, kernel_q)
    if activation is not None and not fuse_activation:
        y = activation(y)
    return y


def _int8_work(x, kernel_q, kernel_scale, bias=None, **options):
    if not (x.shape.is_fully_defined() and kernel_q.shape.is_fully_defined()):
        return None
    return flops_lib.dense_flops(x.shape[:-1].num_elements(), *kernel_q.shape)


def _int8_not_supported_reasons(implementation, *, platform, dtype, **options):
    if implementation != dispatch.NATIVE:
        return []
    return native_dense_int8.not_supported_reasons(platform=platform, dtype=dtype)


DENSE_INT8 = dispatch.Kernel(
    "dense_int8",
    dense_int8_reference,
    dense_int8_compiled,
    auto=AUTO["dense_int8"],
    work=_int8_work,
    not_supported_reasons=_int8_not_supported_reasons,
    native=native_dense_int8.NATIVE,
)


def dense_int8(x, kernel_q, kernel_scale, bias=None, *, epsilon=1e-7, activation=None, implementation=None):
    """``activation(x · kernel + bias)`` with Keras's int8 quantization of ``x`` and ``kernel``.

    Computes what ``keras.layers.Dense`` computes after ``quantize("int8")``, from the
    weights it saves: each row of ``x`` is quantized to int8 with its own abs-max
    scale, multiplied by the int8 kernel with int32 accumulation, and dequantized.
    ``"native"`` does it in one C++ op (float32 on CPU, exact int32 sums, the
    kernel packed once and re-packed when it changes; not inside ``jit_compile``).

    Args:
        x: ``[..., K]`` floating tensor.
        kernel_q: ``[K, N]`` int8 tensor (Keras's ``_kernel`` after quantization).
        kernel_scale: ``[N]`` floating tensor, Keras's ``kernel_scale``
            (``kernel ≈ kernel_q / kernel_scale``).
        bias: optional ``[N]`` tensor of the dtype of ``x``.
        epsilon: added to each row's abs-max before the scale is taken (Keras's
            ``AbsMaxQuantizer.epsilon``, ``keras.config.epsilon()`` by default).
        activation: optional callable applied to the pre-activation.
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"``.

    Returns:
        ``[..., N]`` tensor of the dtype of ``x``.
    """
    dispatch.check_implementation(implementation)
    x = tf.convert_to_tensor(x)
    kernel_q = tf.convert_to_tensor(kernel_q)
    kernel_scale = tf.convert_to_tensor(kernel_scale)
    bias = None if bias is None else tf.convert_to_tensor(bias)
    if kernel_q.dtype != tf.int8:
        raise TypeError(f"`kernel_q` must be an int8 tensor. Received: kernel_q.dtype={kernel_q.dtype.name}")
    dtype = _check_shapes(x, kernel_q, bias)
    if tuple(kernel_scale.shape) != (kernel_q.shape[1],):
        raise ValueError(
            f"`kernel_scale` must have shape ({kernel_q.shape[1]},), one scale per unit. "
            f"Received: kernel_scale.shape={tuple(kernel_scale.shape)}"
        )
    check_floating("kernel_scale", kernel_scale)
    check_same_dtype("x", dtype, bias=bias)
    return DENSE_INT8(
        x, kernel_q, kernel_scale, bias, implementation=implementation,
        epsilon=float(epsilon), activation=activation,
    )
