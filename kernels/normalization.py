"""Layer normalization and RMS normalization over one or several axes.

Shape letters: ``x [..., D]`` in the common case, where ``D`` is the normalized axis;
in general the normalized axes (``axis``, any subset of the axes of ``x``) hold
``D`` elements per row and ``gamma``/``beta``/``scale`` have their sizes.

- ``layer_normalization``: ``(x - mean) * rsqrt(var + epsilon) * gamma + beta``, the
  formula of ``keras.layers.LayerNormalization``; with ``rms_scaling=True`` (Keras's
  deprecated flag) ``x * rsqrt(var + epsilon) * gamma``, as Keras computes it.
- ``rms_normalization``: ``x * rsqrt(mean(x²) + epsilon) * scale``, the formula of
  ``keras.layers.RMSNormalization``.

Statistics are carried in float32 (float64 stays float64) whatever the input dtype,
as Keras does; the result is rounded once to the dtype of ``x``. The variance is the
mean of squared deviations from the mean (two passes over a row), never
``mean(x²) - mean²``, which cancels catastrophically when a row's mean is large
against its spread. XLA fuses the reductions and the normalization of a row into
loops over the input, so the compiled path reads ``x`` about twice and writes once,
where Keras's graph runs a dozen separate element-wise and reduction ops. The
native op (``kernels.native.normalization``) reads each row from memory once and
makes both passes in L1.
"""

from __future__ import annotations

import numbers

import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels.auto import AUTO, EAGER_REFERENCE_BELOW
from fastlayers.kernels.native import normalization as native_normalization
from fastlayers.kernels.precision import accumulation_dtype


def _broadcast(weight, x, axis):
    """``weight`` (the sizes of the normalized axes) reshaped to broadcast against ``x``.

    ``axis`` counts from the end (negative), so the shape needs no rank: a
    shape-generic trace may not know it, and XLA needs the shape as a constant. A
    full-rank weight (checked by the public function) is used as it is.
    """
    if weight is None:
        return None
    weight = tf.cast(weight, accumulation_dtype(x.dtype))
    if weight.shape.rank != len(axis):
        return weight
    shape = [1] * -axis[0]
    for i, a in enumerate(axis):
        shape[a] = weight.shape[i] if weight.shape[i] is not None else tf.shape(weight)[i]
    return tf.reshape(weight, shape)


def normalization_reference(x, scale, offset, *, axis, epsilon, centered, subtract_mean):
    """The spec of both kernels, step by step, statistics in the accumulation dtype.

    ``centered``: the variance is taken around the row's mean (layer normalization);
    otherwise it is the mean square (RMS normalization). ``subtract_mean``: the
    output is centered too (layer normalization without ``rms_scaling``).
    """
    xf = tf.cast(x, accumulation_dtype(x.dtype))
    deviation = xf - tf.reduce_mean(xf, axis=axis, keepdims=True) if centered else xf
    variance = tf.reduce_mean(tf.square(deviation), axis=axis, keepdims=True)
    normalized = (deviation if subtract_mean else xf) * tf.math.rsqrt(variance + epsilon)
    scale, offset = _broadcast(scale, x, axis), _broadcast(offset, x, axis)
    if scale is not None:
        normalized = normalized * scale
    if offset is not None:
        normalized = normalized + offset
    return tf.cast(normalized, x.dtype)


def normalization_compiled(x, scale, offset, *, axis, epsilon, centered, subtract_mean):
    """The graph/XLA algorithm: ``x * a + c`` with per-row ``a`` and ``c``.

    ``a = rsqrt(var + epsilon) * scale`` and ``c = offset - mean * a`` fold the
    normalization and the affine map into one multiply-add per element, which XLA
    fuses with the cast in and out of float32.
    """
    xf = tf.cast(x, accumulation_dtype(x.dtype))
    mean = tf.reduce_mean(xf, axis=axis, keepdims=True) if centered else None
    deviation = xf - mean if centered else xf
    a = tf.math.rsqrt(tf.reduce_mean(tf.square(deviation), axis=axis, keepdims=True) + epsilon)
    scale, offset = _broadcast(scale, x, axis), _broadcast(offset, x, axis)
    if scale is not None:
        a = a * scale
    c = -mean * a if subtract_mean else None
    if offset is not None:
        c = offset if c is None else c + offset
    return tf.cast(xf * a if c is None else xf * a + c, x.dtype)


def _work(x, *_, centered, **__):
    if not x.shape.is_fully_defined():
        return None
    return flops_lib.normalization_flops(x.shape.num_elements(), rms=not centered)


def _native_reasons(implementation, *, platform, dtype, axis, **_):
    if implementation != dispatch.NATIVE:
        return []
    return native_normalization.not_supported_reasons(platform=platform, dtype=dtype, axis=axis)


# Both kernels run the same functions; their options say which statistics and
# output: layer normalization is ``centered`` (and ``subtract_mean`` unless
# Keras's rms_scaling), RMS normalization neither. They keep their own auto rows,
# eager thresholds and tuning records.
LAYER_NORMALIZATION, RMS_NORMALIZATION = (
    dispatch.Kernel(
        name,
        normalization_reference,
        normalization_compiled,
        auto=AUTO[name],
        not_supported_reasons=_native_reasons,
        native=native_normalization.NATIVE,
        work=_work,
        eager_reference_below=EAGER_REFERENCE_BELOW[name],
    )
    for name in ("layer_normalization", "rms_normalization")
)


def check_axis(axis) -> list[int]:
    """``axis`` (an int or a non-empty list/tuple of ints) as a list; else raises ValueError."""
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if not axes or not all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes
    ):
        raise ValueError(
            "Received an invalid value for `axis`, expected an int or a non-empty "
            f"list/tuple of ints. Received: axis={axis!r}"
        )
    return [int(a) for a in axes]


def standardize_axis(axis, rank) -> tuple[int, ...]:
    """``axis`` as sorted distinct non-negative axes of an input of rank ``rank``.

    Raises:
        ValueError: if ``axis`` is not an int or a non-empty list/tuple of distinct
            ints, an axis is out of range for ``rank``, or the rank is unknown.
    """
    axes = check_axis(axis)
    if rank is None:
        raise ValueError(
            f"Normalization needs the rank of its input to be known. Received: axis={axis!r}"
        )
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"Received an invalid value for `axis`: axis {a} is out of bounds for an "
                f"input of rank {rank}. Received: axis={axis!r}"
            )
    positive = sorted(a % rank for a in axes)
    if len(set(positive)) != len(positive):
        raise ValueError(
            "Received an invalid value for `axis`, expected distinct axes. "
            f"Received: axis={axis!r} for an input of rank {rank}"
        )
    return tuple(positive)


def check_epsilon(epsilon) -> float:
    """``epsilon`` as a float if it is a non-negative finite number; else raises."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, numbers.Real)
        or not 0 <= float(epsilon) < float("inf")
    ):
        raise ValueError(
            "Received an invalid value for `epsilon`, expected a non-negative number. "
            f"Received: epsilon={epsilon!r}"
        )
    return float(epsilon)


def _check_weight(name, weight, x, axis):
    if weight is None:
        return None
    weight = tf.convert_to_tensor(weight)
    if not weight.dtype.is_floating:
        raise TypeError(
            f"`{name}` must have a floating dtype. Received: {name}.dtype={weight.dtype.name}"
        )
    expected = tuple(x.shape[a] for a in axis)
    shape = tuple(weight.shape)
    full_rank = len(shape) == x.shape.rank and all(
        s in (1, None) for i, s in enumerate(shape) if i not in axis
    )
    matches = full_rank or len(shape) == len(axis)
    if matches:
        sizes = [shape[a] for a in axis] if full_rank else list(shape)
        matches = all(
            s is None or e is None or s == e for s, e in zip(sizes, expected, strict=True)
        )
    if not matches:
        raise ValueError(
            f"`{name}` must have the sizes of the normalized axes {list(axis)} of `x`, "
            f"{expected}. Received: {name}.shape={shape}, x.shape={tuple(x.shape)}"
        )
    return weight


def layer_normalization(
    x, gamma=None, beta=None, *, axis=-1, epsilon=1e-3, rms_scaling=False, implementation=None
):
    """Layer normalization with float32 statistics, equal to ``keras.ops.layer_normalization``.

    Args:
        x: floating tensor of known rank.
        gamma: optional scale with the sizes of the normalized axes (or of full rank,
            broadcasting over the others); any floating dtype, used in float32.
        beta: optional offset, shaped as ``gamma``; ignored when ``rms_scaling``.
        axis: int or list/tuple of ints, the axes to normalize over.
        epsilon: non-negative number added to the variance.
        rms_scaling: Keras's deprecated flag: scale ``x`` by ``rsqrt(var + epsilon)``
            without centering it.
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"`` (CPU; the normalized axes must be the last ones).

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    x = dispatch.floating_input(x, implementation)
    axis = standardize_axis(axis, x.shape.rank)
    epsilon = check_epsilon(epsilon)
    gamma = _check_weight("gamma", gamma, x, axis)
    beta = _check_weight("beta", beta, x, axis)
    return LAYER_NORMALIZATION(
        x, gamma, None if rms_scaling else beta, implementation=implementation,
        axis=_from_end(axis, x), epsilon=epsilon, centered=True, subtract_mean=not rms_scaling,
    )


def rms_normalization(x, scale=None, *, axis=-1, epsilon=1e-6, implementation=None):
    """RMS normalization with float32 statistics, equal to ``keras.ops.rms_normalization``.

    Args:
        x: floating tensor of known rank.
        scale: optional scale with the sizes of the normalized axes (or of full
            rank, broadcasting over the others); any floating dtype, used in float32.
        axis: int or list/tuple of ints, the axes to normalize over.
        epsilon: non-negative number added to the mean square.
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"`` (CPU; the normalized axes must be the last ones).

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    x = dispatch.floating_input(x, implementation)
    axis = standardize_axis(axis, x.shape.rank)
    epsilon = check_epsilon(epsilon)
    scale = _check_weight("scale", scale, x, axis)
    return RMS_NORMALIZATION(
        x, scale, None, implementation=implementation,
        axis=_from_end(axis, x), epsilon=epsilon, centered=False, subtract_mean=False,
    )


def _from_end(axis, x):
    # Negative axes name the same axes of any rank: one trace serves inputs of
    # several ranks, and the weights' broadcast shape needs no rank (``_broadcast``).
    return tuple(a - x.shape.rank for a in axis)
