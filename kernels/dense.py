"""Dense: ``activation(x · kernel + bias)``.

Shape letters: ``x [..., K]``, ``kernel [K, N]``, ``bias [N]``, output ``[..., N]``;
``M`` is the product of the leading axes of ``x`` (the rows of the matmul).
"""

from __future__ import annotations

import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels.auto import AUTO
from fastlayers.kernels.validation import check_floating, check_same_dtype
from fastlayers.kernels.precision import (
    LOW_PRECISION_DTYPES,
    accumulation_dtype,
)


def dense_reference(x, kernel, bias=None, *, activation=None):
    """The spec: contract in the accumulation dtype, add bias, activate, cast back."""
    acc = accumulation_dtype(x.dtype)
    y = tf.tensordot(tf.cast(x, acc), tf.cast(kernel, acc), axes=1)  # [..., K]·[K, N]
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


def dense_compiled(x, kernel, bias=None, *, activation=None):
    """The graph/XLA algorithm: one 2-D MatMul → BiasAdd → activation chain.

    That chain is the pattern grappler's remapper fuses into a single ``_FusedMatMul``
    (oneDNN or Eigen on CPU, cuBLASLt on GPU), and XLA fuses the epilogue into one
    loop. Operands are widened as ``rows_matmul`` says.
    """
    y = rows_matmul(x, kernel)  # [M, N]
    if bias is not None:
        y = _bias_add(y, tf.cast(bias, y.dtype))
    fuse_activation = activation is not None and _acts_on_last_axis_only(activation)
    if fuse_activation:
        y = activation(y)
    y = unflatten_rows(y, x, kernel)
    if activation is not None and not fuse_activation:
        y = activation(y)
    return tf.cast(y, x.dtype)


def _work(x, kernel, bias=None, *, activation=None):
    if not (x.shape.is_fully_defined() and kernel.shape.is_fully_defined()):
        return None
    return flops_lib.dense_flops(x.shape.num_elements() // x.shape[-1], *kernel.shape)


DENSE = dispatch.Kernel(
    "dense", dense_reference, dense_compiled, auto=AUTO["dense"], work=_work
)


def _check_dense_inputs(x, kernel, bias):
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
    check_same_dtype("x", dtype, kernel=kernel, bias=bias)


def dense(x, kernel, bias=None, *, activation=None, implementation=None):
    """``activation(x · kernel + bias)`` with float32 accumulation.

    Args:
        x: ``[..., K]`` floating tensor.
        kernel: ``[K, N]`` tensor of the dtype of ``x``.
        bias: optional ``[N]`` tensor of the dtype of ``x``.
        activation: optional callable applied to the pre-activation.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Returns:
        ``[..., N]`` tensor of the dtype of ``x``.
    """
    dispatch.check_implementation(implementation)
    x = tf.convert_to_tensor(x)
    kernel = tf.convert_to_tensor(kernel)
    bias = None if bias is None else tf.convert_to_tensor(bias)
    _check_dense_inputs(x, kernel, bias)
    return DENSE(x, kernel, bias, implementation=implementation, activation=activation)
