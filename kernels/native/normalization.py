"""The native normalization (``normalization.cc``) behind the compiled path's signature.

Shape letters as in ``fastlayers.kernels.normalization``: ``x [..., D]`` with the
normalized axes last; the op sees ``x`` as ``[R, D]`` (``R`` rows of ``D`` elements).

The op makes one pass per row: it reads the row from memory once, computes its
float32 statistics and the output in L1, and writes the output once. Its gradient,
registered for the op type, recomputes the compiled algorithm's forward and
backward under XLA (``normalization_compiled``), so training through it is exactly
as correct as training through ``"xla"``.

Dispatch runs it as ``NATIVE`` (``Kernel(native=...)``): it takes trailing normalized
axes only (``not_supported_reasons``), dispatch refuses it inside an XLA cluster and
asks ``not_built_reason`` whether the library builds, and the auto table passes it
over while a gradient tape records (``auto_while_training``).
"""

from __future__ import annotations

import tensorflow as tf
from fastlayers.kernels.native import attention as native_attention
from fastlayers.kernels.native import build as build_lib

def not_supported_reasons(*, platform, dtype, axis) -> list[str]:
    """Why the native op cannot take a call; empty when it can. ``axis`` counts from
    the end, as the kernel passes it. Whether it builds is ``not_built_reason``'s.
    The device and dtypes are the library's, as for attention."""
    reasons = native_attention.not_supported_reasons(platform=platform, dtype=dtype)
    if tuple(axis) != tuple(range(-len(axis), 0)):
        reasons.append(
            "the native kernel normalizes trailing axes only (rows of contiguous "
            f"elements); received axis={tuple(axis)} counted from the end"
        )
    return reasons


class NativeNormalization:
    """The ``"native"`` implementation of both normalization kernels as dispatch runs
    it: ``normalization_native``.

    Attributes:
        auto_while_training: False: while a gradient tape records, the auto table
            takes the compiled paths, since this op's gradient recomputes the
            compiled forward first. An explicit request runs it there.
    """

    auto_while_training = False

    def __call__(self, x, scale, offset, **options):
        return normalization_native(x, scale, offset, **options)

    def not_built_reason(self) -> str | None:
        """Why the op library cannot run in this process, or None (it builds first;
        a failure warns once)."""
        return build_lib.not_built_reason("the native normalization kernel")


NATIVE = NativeNormalization()


def normalization_native(x, scale, offset, *, axis, epsilon, centered, subtract_mean):
    """The native forward, with the semantics of ``normalization_compiled``.

    Args:
        x: float32, float16 or bfloat16 tensor whose normalized axes, ``axis``
            (negative, counted from the end), are its last ones.
        scale: None or a tensor of the normalized axes' sizes (any floating dtype;
            a full-rank one whose other axes are 1 is taken as well).
        offset: None or a tensor shaped as ``scale``.
        epsilon: non-negative number added to the variance.
        centered: statistics around the row's mean (layer normalization), or the
            mean square (RMS normalization).
        subtract_mean: subtract the mean from the output (layer normalization
            without Keras's ``rms_scaling``).

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    library = build_lib.load_once()
    # Static sizes where they are known (always, eagerly): an eager call then runs
    # the op alone, without the shape arithmetic a generic trace needs.
    # Explicit row counts, never -1: a reshape cannot infer a size from an empty tensor.
    k = len(axis)
    leading, normalized = x.shape[: x.shape.rank - k], x.shape[x.shape.rank - k :]
    if k == 1 and x.shape.rank == 2:
        rows = x
    elif leading.is_fully_defined() and normalized.is_fully_defined():
        rows = tf.reshape(x, [leading.num_elements(), normalized.num_elements()])
    else:
        shape = tf.shape(x)
        rows = tf.reshape(x, tf.stack([tf.reduce_prod(shape[:-k]), tf.reduce_prod(shape[-k:])]))
    y = library.fastlayers_normalization(
        rows, _vector(scale), _vector(offset), epsilon=float(epsilon),
        centered=bool(centered), subtract_mean=bool(subtract_mean),
    )
    return y if rows is x else tf.reshape(y, tf.shape(x))


_empty = None


def _vector(weight):
    """``weight`` as the op takes it: float32 [D], or [0] when absent."""
    global _empty
    if weight is None:
        if _empty is None:
            with tf.init_scope():
                _empty = tf.zeros([0], tf.float32)
        return _empty
    if weight.dtype != tf.float32:
        weight = tf.cast(weight, tf.float32)
    return weight if weight.shape.rank == 1 else tf.reshape(weight, [-1])


@tf.RegisterGradient("FastlayersNormalization")
def _normalization_gradient(op, d_out):
    """The op's gradient by the compiled algorithm under XLA, on its [R, D] view;
    None for an absent (empty) scale or offset."""
    x, scale, offset = op.inputs
    options = dict(
        axis=(-1,), epsilon=op.get_attr("epsilon"), centered=op.get_attr("centered"),
        subtract_mean=op.get_attr("subtract_mean"),
    )
    present = [w.shape[0] != 0 for w in (scale, offset)]
    grads = _compiled_gradient(x, scale, offset, d_out, tuple(present), options)
    return grads


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _compiled_gradient(x, scale, offset, d_out, present, options):
    """The gradients of x, scale and offset (None for an absent one) against
    ``d_out``, by the compiled algorithm's forward and backward under XLA."""
    from fastlayers.kernels import normalization as normalization_lib

    inputs = [x] + [w for w, given in zip((scale, offset), present) if given]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        given = iter(inputs[1:])
        scale, offset = (next(given) if p else None for p in present)
        out = normalization_lib.normalization_compiled(x, scale, offset, **options)
    found = iter(tape.gradient(out, inputs, output_gradients=d_out))
    return [next(found)] + [next(found) if p else None for p in present]
