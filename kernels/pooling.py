"""Max pooling over the two spatial axes of an image batch.

Shape letters: ``B`` batch, ``H`` height, ``W`` width, ``C`` channels; the pooled
height and width are ``P`` and ``Q``. ``channels_last`` is ``[B, H, W, C]`` →
``[B, P, Q, C]``; ``channels_first`` is ``[B, C, H, W]`` → ``[B, C, P, Q]``.

Pooled sizes follow Keras and TensorFlow: ``"valid"`` gives
``floor((H - pool) / stride) + 1``, ``"same"`` gives ``ceil(H / stride)`` with the odd
padding row or column after the input, not before.

Gradient routing of ties: when several inputs of a window share its maximum, the
window's whole gradient goes to the first of them in row-major order within the
window, and overlapping windows add up. TensorFlow's CPU ``MaxPoolGrad`` (strict
``>`` while scanning the window) does this. XLA lowers ``MaxPoolGrad`` to
``select-and-scatter`` (selector ``>=`` keeps the earlier element), which does it
too without padding or with even padding; with uneven ``"same"`` padding (the odd
row or column after the input) it sends a tied window's gradient to another of its
maxima, even in windows that hold no padding (pool 2, stride 2 on a 3x3 input whose
top-left window is ``[[0, 1], [1, 0]]``: to (1, 0), not (0, 1)). So under XLA the
compiled path gives ``"same"`` to the pooling op only where the padding is known
(static shapes) to be even; otherwise it pads the input with ``-inf`` by
TensorFlow's ``"same"`` amounts and pools ``"valid"``, which routes ties as the CPU
kernel does; where the windows then tile the padded input, the element-wise
passes below replace ``reduce-window`` and ``select-and-scatter`` altogether. With that, every
implementation routes ties alike, and the tests pin it against a numpy oracle and
Keras. One difference remains on that explicit padding where some of it comes
before the input (uneven padding of 3 or more rows or columns, or spatial sizes
unknown when traced, as in the shape-generic retrace of a kernel called with a
second shape): a window whose inputs are all ``-inf`` ties with the padding before
them, which comes first, so its gradient goes to the padding and is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels import platform
from fastlayers.kernels.auto import AUTO
from fastlayers.kernels.validation import check_positive_pair, standardize_choice

DATA_FORMATS = ("channels_last", "channels_first")
PADDINGS = ("valid", "same")

_NCHW_TO_NHWC = (0, 2, 3, 1)
_NHWC_TO_NCHW = (0, 3, 1, 2)


def max_pool2d_reference(x, *, pool_size, strides, padding, data_format):
    """The spec: TensorFlow's ``MaxPool``, the op ``keras.layers.MaxPooling2D`` runs.

    TensorFlow's CPU ``MaxPool`` takes NHWC only, so ``channels_first`` goes through
    two transposes, exactly as Keras's TensorFlow backend does.
    """
    if data_format == "channels_first":
        x = tf.transpose(x, _NCHW_TO_NHWC)  # [B, C, H, W] -> [B, H, W, C]
    y = tf.nn.max_pool2d(x, pool_size, strides, padding.upper(), data_format="NHWC")
    if data_format == "channels_first":
        y = tf.transpose(y, _NHWC_TO_NCHW)  # [B, P, Q, C] -> [B, C, P, Q]
    return y


def _tiled_max_pool2d_xla(x, pool_size, data_format):
    """Non-overlapping ``"valid"`` pooling as element-wise passes, forward and backward.

    XLA lowers TensorFlow's ``MaxPool`` to ``reduce-window``, which reads the input
    with a stride, and ``MaxPoolGrad`` to ``select-and-scatter``, which is slow on CPU.
    When the windows tile the input, a window's ``ph·pw`` elements are ``ph·pw``
    strided views of it (``_window_elements``): the forward is their element-wise
    maximum, and the gradient a select per element: each input gets its window's
    gradient if it is the window's first maximum in row-major order, else zero; rows
    and columns past the last whole window get zero. Same routing, ties included.
    Each direction is one fused loop that streams through memory once.
    """
    elements = _window_elements(x, pool_size, data_format)
    y = functools.reduce(tf.maximum, [e for row in elements for e in row])

    def grad(dy):
        if data_format == "channels_last":
            return _to_first_maximum(x, y, dy, elements, pool_size)
        zero = tf.zeros([], dy.dtype)
        taken = None  # where an earlier element of the window was the first maximum
        dx = []
        for row in elements:
            dx.append([])
            for element in row:
                hit = tf.equal(element, y)
                first = hit if taken is None else hit & ~taken
                taken = first if taken is None else taken | first
                dx[-1].append(tf.where(first, dy, zero))
        return _from_window_elements(dx, x, pool_size, data_format)

    return y, grad


def _to_first_maximum(x, y, dy, elements, pool_size):
    """The channels_last tiled gradient as one select over ``x``'s shape.

    The row-major position of each window's first maximum is pooled-sized; comparing
    it, broadcast, with each input's position in its window
    (``[B, P, ph, Q, pw, C]``) lets XLA write ``dx`` in one fused loop: measured at
    0.47x the time of assembling it from per-element selects as channels_first does
    (where that assembly is the faster of the two: its window columns are the
    innermost axis, so broadcasting over them vectorizes poorly).
    """
    ph, pw = pool_size
    flat = [e for row in elements for e in row]
    first = tf.fill(tf.shape(y), len(flat))  # len(flat): no maximum (a NaN window)
    for k in reversed(range(len(flat))):
        first = tf.where(tf.equal(flat[k], y), k, first)
    position = tf.reshape(tf.range(ph * pw), [ph, 1, pw, 1])
    dx = tf.where(
        tf.equal(first[:, :, None, :, None, :], position),
        dy[:, :, None, :, None, :],
        tf.zeros([], dy.dtype),
    )
    b, h, w, c = _dims(x)
    p, q = h // ph, w // pw
    dx = tf.reshape(dx, [b, p * ph, q * pw, c])
    return tf.pad(dx, [[0, 0], [0, h - p * ph], [0, w - q * pw], [0, 0]])


def _dims(x):
    """The axes' sizes of ``x``: ints where known when traced, scalar tensors elsewhere."""
    dynamic = tf.shape(x)
    return [size if size is not None else dynamic[i] for i, size in enumerate(x.shape)]


def _window_elements(x, pool_size, data_format):
    """``e[i][j]``: element ``(i, j)`` of every whole window, shaped as the pooled output.

    A window row is a contiguous run of ``pw`` pixels, so one reshape puts the
    window's rows on an axis and, channels_last, its columns side by side on the
    last one: ``[B, H, W, C] -> [B, P, ph, Q, pw·C]``, ``[B, C, H, W] -> [B, C, P,
    ph, Q, pw]``. Rows and columns past the last whole window are left out.
    """
    ph, pw = pool_size
    if data_format == "channels_last":
        b, h, w, c = _dims(x)
        p, q = h // ph, w // pw
        rows = tf.reshape(x[:, : p * ph, : q * pw, :], [b, p, ph, q, pw * c])
        return [[rows[:, :, i, :, j * c : (j + 1) * c] for j in range(pw)] for i in range(ph)]
    b, c, h, w = _dims(x)
    p, q = h // ph, w // pw
    windows = tf.reshape(x[:, :, : p * ph, : q * pw], [b, c, p, ph, q, pw])
    return [[windows[:, :, :, i, :, j] for j in range(pw)] for i in range(ph)]


def _from_window_elements(elements, x, pool_size, data_format):
    """The inverse of ``_window_elements``: a tensor shaped as ``x``, zero past the windows."""
    ph, pw = pool_size
    if data_format == "channels_last":
        b, h, w, c = _dims(x)
        p, q = h // ph, w // pw
        rows = tf.stack([tf.concat(row, axis=-1) for row in elements], axis=2)
        dx = tf.reshape(rows, [b, p * ph, q * pw, c])
        return tf.pad(dx, [[0, 0], [0, h - p * ph], [0, w - q * pw], [0, 0]])
    b, c, h, w = _dims(x)
    p, q = h // ph, w // pw
    windows = tf.stack([tf.stack(row, axis=-1) for row in elements], axis=3)
    dx = tf.reshape(windows, [b, c, p * ph, q * pw])
    return tf.pad(dx, [[0, 0], [0, 0], [0, h - p * ph], [0, w - q * pw]])


def _same_padding(size, pool, stride):
    """TensorFlow's ``"same"`` padding of one axis: ``(before, after)``, the odd one after.

    ``size`` is an int, or a scalar tensor when the axis is unknown at trace time.
    """
    out = -(-size // stride)  # ceil(size / stride)
    total = (out - 1) * stride + pool - size
    total = max(total, 0) if isinstance(total, int) else tf.maximum(total, 0)
    before = total // 2
    return before, total - before


def _same_paddings(x, pool_size, strides, data_format):
    """``tf.pad`` paddings of rank-4 ``x`` as ``"same"`` pads its spatial axes."""
    spatial_axes = (1, 2) if data_format == "channels_last" else (2, 3)
    static, dynamic = x.shape, tf.shape(x)
    paddings = [[0, 0] for _ in range(4)]
    for axis, pool, stride in zip(spatial_axes, pool_size, strides, strict=True):
        size = static[axis] if static[axis] is not None else dynamic[axis]
        paddings[axis] = list(_same_padding(size, pool, stride))
    return paddings


def _xla_same_is_exact(paddings):
    # XLA's own "same" routes ties as TensorFlow's CPU kernel when the padding is even,
    # -inf inputs included (its padding never takes a gradient); it must be known to be.
    if not all(isinstance(amount, int) for pair in paddings for amount in pair):
        return False
    padded = [(before, after) for before, after in paddings if before or after]
    return bool(padded) and all(before == after for before, after in padded)


@dataclasses.dataclass(frozen=True)
class PoolingVariant:
    """The facts of a pooling call that decide its fastest path (one per call, not
    tuned): the layout, and whether the windows tile the input (``"valid"``,
    ``strides == pool_size``), which XLA pools by element-wise passes.

    Attributes:
        data_format: ``"channels_last"`` or ``"channels_first"``.
        tiled: whether the windows tile the input.
    """

    data_format: str = "channels_last"
    tiled: bool = False

    @property
    def auto_row(self) -> str | None:
        """The auto table's row for these facts (None: the plain channels_last row)."""
        name = "channels_first" if self.data_format == "channels_first" else ""
        if self.tiled:
            name = f"{name}_tiled" if name else "tiled"
        return name or None

    @property
    def label(self) -> str:
        return ""


def variant_of(*, pool_size, strides, padding, data_format) -> PoolingVariant:
    """The ``PoolingVariant`` of a standardized call."""
    tiled = padding == "valid" and tuple(strides) == tuple(pool_size)
    return PoolingVariant(data_format, tiled)


def max_pool2d_compiled(x, *, pool_size, strides, padding, data_format):
    """The graph/XLA algorithm: pool in the input's own layout wherever a kernel exists.

    XLA's ``reduce-window`` and cuDNN take NCHW directly, which saves two full
    transposes of the input; TensorFlow's CPU graph kernel still needs NHWC. Under
    XLA, ``"same"`` is explicit ``-inf`` padding then ``"valid"`` pooling unless the
    padding is known to be even (XLA's own ``"same"`` gradient routes ties
    differently when it is uneven; see the module docstring), and windows that tile
    the (padded) input (``strides == pool_size``) are pooled and differentiated by
    element-wise passes over strided views in place of ``reduce-window`` and
    ``select-and-scatter`` (``_tiled_max_pool2d_xla``). Whether the trace is XLA's
    is asked of the graph, not of the implementation selected: a graph-path call
    inlined into a jit-compiled function runs under XLA too; and the windows may
    tile only once ``"same"`` became explicit padding, so the ``PoolingVariant``
    (which picks the auto row) is not enough here.
    """
    in_xla = platform.in_xla_context()
    if in_xla and padding == "same":
        paddings = _same_paddings(x, pool_size, strides, data_format)
        if not _xla_same_is_exact(paddings):
            x = tf.pad(x, paddings, constant_values=float("-inf"))
            padding = "valid"
    if in_xla and padding == "valid" and tuple(strides) == tuple(pool_size):
        return tf.custom_gradient(
            lambda t: _tiled_max_pool2d_xla(t, tuple(pool_size), data_format)
        )(x)
    if data_format == "channels_first" and (in_xla or dispatch.platform_of(x) == "gpu"):
        return tf.nn.max_pool2d(x, pool_size, strides, padding.upper(), data_format="NCHW")
    return max_pool2d_reference(
        x, pool_size=pool_size, strides=strides, padding=padding, data_format=data_format
    )


def _variants(implementation, *, platform, dtype, shapes, pool_size, strides, padding, data_format):
    return (variant_of(pool_size=pool_size, strides=strides, padding=padding, data_format=data_format),)


def _auto_row(*, pool_size, strides, padding, data_format):
    return variant_of(
        pool_size=pool_size, strides=strides, padding=padding, data_format=data_format
    ).auto_row


def _work(x, *, pool_size, strides, padding, data_format):
    if not x.shape.is_fully_defined():
        return None
    output = pooled_shape(x.shape, pool_size, strides, padding, data_format)
    return flops_lib.pooling_flops(math.prod(output), pool_size)


# One kernel: the layout and whether the windows tile the input are its variant,
# and each has its own auto row (see kernels/auto.py).
MAX_POOL2D = dispatch.Kernel(
    "max_pool2d",
    max_pool2d_reference,
    max_pool2d_compiled,
    auto=AUTO["max_pool2d"],
    variants=_variants,
    auto_row=_auto_row,
    work=_work,
)


def pooled_size(size, pool, stride, padding):
    """The pooled length of one spatial axis (None when ``size`` is unknown)."""
    if size is None:
        return None
    if padding == "same":
        return math.ceil(size / stride)
    return (size - pool) // stride + 1


def pooled_shape(input_shape, pool_size, strides, padding, data_format):
    """The output shape of ``max_pool2d`` for a rank-4 ``input_shape``; raises if empty."""
    input_shape = tuple(input_shape)
    spatial_axes = (1, 2) if data_format == "channels_last" else (2, 3)
    output_shape = list(input_shape)
    for axis, pool, stride in zip(spatial_axes, pool_size, strides, strict=True):
        size = pooled_size(input_shape[axis], pool, stride, padding)
        if size is not None and size <= 0:
            raise ValueError(
                f"With padding={padding!r}, `pool_size` must fit in the input's spatial axes "
                f"({data_format}: axes {spatial_axes}). "
                f"Received: pool_size={tuple(pool_size)}, inputs.shape={input_shape}"
            )
        output_shape[axis] = size
    return tuple(output_shape)


def max_pool2d(
    x,
    pool_size=(2, 2),
    strides=None,
    padding="valid",
    data_format="channels_last",
    *,
    implementation=None,
):
    """2-D max pooling, equal to ``keras.ops.max_pool`` on a rank-4 input.

    The arguments are standardized as ``keras.ops.max_pool`` and
    ``keras.layers.MaxPooling2D`` take them (an int for both axes, any case), except
    that ``data_format`` defaults to ``"channels_last"`` rather than to
    ``keras.config.image_data_format()``: a kernel reads no Keras configuration.

    Args:
        x: ``[B, H, W, C]`` (channels_last) or ``[B, C, H, W]`` (channels_first)
            floating tensor.
        pool_size: positive int or tuple of 2, the window's height and width.
        strides: positive int or tuple of 2, or None for ``pool_size``.
        padding: ``"valid"`` or ``"same"`` (case-insensitive).
        data_format: ``"channels_last"`` or ``"channels_first"`` (case-insensitive).
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Returns:
        ``[B, P, Q, C]`` or ``[B, C, P, Q]`` tensor of the dtype of ``x``.
    """
    pool_size = check_positive_pair("pool_size", pool_size)
    strides = pool_size if strides is None else check_positive_pair("strides", strides)
    padding = standardize_choice("padding", padding, PADDINGS)
    data_format = standardize_choice("data_format", data_format, DATA_FORMATS)
    x = dispatch.floating_input(x, implementation)
    if x.shape.rank != 4:
        layout = "[B, H, W, C]" if data_format == "channels_last" else "[B, C, H, W]"
        raise ValueError(
            f"`x` must have rank 4 ({layout}). Received: x.shape={tuple(x.shape)}"
        )
    return pool_checked(x, pool_size, strides, padding, data_format, implementation)


def pool_checked(x, pool_size, strides, padding, data_format, implementation):
    """``max_pool2d`` on standardized arguments and a rank-4 tensor: checks the window
    fits, then dispatches. A non-floating ``x`` (``MaxPooling2D`` takes integer
    images, as Keras's does) runs TensorFlow's op, the reference."""
    pooled_shape(x.shape, pool_size, strides, padding, data_format)
    options = dict(pool_size=pool_size, strides=strides, padding=padding, data_format=data_format)
    if not x.dtype.is_floating:
        return max_pool2d_reference(x, **options)
    return MAX_POOL2D(x, implementation=implementation, **options)
