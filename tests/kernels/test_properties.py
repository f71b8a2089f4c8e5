"""Property tests: random shapes, dtypes and implementations against the reference and numpy.

Seeded and bounded; ``-m slow`` runs the long sweep. Every axis a strategy varies
draws 0 too (an empty batch, sequence, feature or head axis), except the spatial axes
a pooling or centring window must fit in.
"""

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from helpers import COMPILED, NUMPY_DTYPES, round_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlayers import kernels
from fastlayers.kernels.precision import tolerance

QUICK = settings(max_examples=12, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
# An attention example compiles an XLA program per path and dtype (about 1.5 s), and
# a differentiated one a forward and a backward program per path (about 6 s), so
# their quick runs have fewer examples; the long runs (-m slow) draw 150.
QUICK_ATTENTION = settings(QUICK, max_examples=6)
QUICK_GRADIENTS = settings(QUICK, max_examples=2)

sizes = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 64, 127]), st.integers(0, 200))
float_dtypes = st.sampled_from(["float16", "bfloat16", "float32"])
activations = st.sampled_from([None, "relu", "tanh", "sigmoid"])


@st.composite
def dense_problems(draw):
    leading = draw(st.lists(sizes, min_size=1, max_size=3).filter(lambda s: np.prod(s) <= 4096))
    k, n = draw(sizes), draw(sizes)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*leading, k))
    w = rng.standard_normal((k, n)) / np.sqrt(max(k, 1))
    b = draw(st.booleans()) and rng.standard_normal(n)
    return x, w, (None if b is False else b)


def _run_dense(x, w, b, dtype, activation, implementation):
    return kernels.dense(
        tf.constant(x, dtype), tf.constant(w, dtype),
        None if b is None else tf.constant(b, dtype),
        activation=keras.activations.get(activation), implementation=implementation,
    )


def _check_dense(problem, dtype, activation):
    x, w, b = (None if a is None else round_to(a, dtype) for a in problem)
    reference = _run_dense(x, w, b, dtype, activation, "reference")
    truth = np.tensordot(x, w, axes=1) + (0 if b is None else b)
    truth = np.asarray(keras.activations.get(activation)(tf.constant(truth)))
    tolerance(dtype).check(reference.numpy().astype(np.float64), truth, what="reference vs numpy")
    for implementation in (None, *COMPILED):
        actual = _run_dense(x, w, b, dtype, activation, implementation)
        tolerance(dtype).check(actual.numpy().astype(np.float64),
                               reference.numpy().astype(np.float64),
                               what=f"{implementation} vs reference")


@QUICK
@given(dense_problems(), float_dtypes, activations)
def test_dense_paths_agree(problem, dtype, activation):
    _check_dense(problem, dtype, activation)


@pytest.mark.slow
@LONG
@given(dense_problems(), float_dtypes, activations)
def test_dense_paths_agree_long(problem, dtype, activation):
    _check_dense(problem, dtype, activation)


def _naive_low_precision_dense(x, w, b, dtype):
    """Every product and partial sum rounded to ``dtype``: the accuracy floor to beat."""
    low = NUMPY_DTYPES[dtype]
    products = (x[..., :, None] * w[None, :, :]).astype(low)  # [M, K, N]
    total = np.zeros(products.shape[:1] + products.shape[2:], low)
    for term in np.moveaxis(products, 1, 0):
        total = (total + term).astype(low)
    return (total + np.asarray(b, low)).astype(low).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("implementation", [None, "reference", *COMPILED])
@pytest.mark.parametrize("k", [1, 64, 1023])
def test_low_precision_error_is_at_most_twice_the_naive_error(dtype, implementation, k, rng):
    x, w, b = (round_to(a, dtype) for a in (rng.standard_normal((16, k)),
                                            rng.standard_normal((k, 8)) / np.sqrt(k),
                                            rng.standard_normal(8)))
    truth = x @ w + b
    fast = _run_dense(x, w, b, dtype, None, implementation).numpy().astype(np.float64)
    naive = _naive_low_precision_dense(x, w, b, dtype)
    fast_error, naive_error = np.abs(fast - truth), np.abs(naive - truth)
    print(f"{dtype} {implementation} K={k}: fast max {fast_error.max():.3g} mean {fast_error.mean():.3g}; "
          f"naive max {naive_error.max():.3g} mean {naive_error.mean():.3g}")
    # half an ulp of the output is the least any path can do
    half_ulp = np.abs(truth) * float(ml_dtypes.finfo(NUMPY_DTYPES[dtype]).eps) / 2
    assert fast_error.max() <= 2 * naive_error.max() + half_ulp.max()
    assert fast_error.mean() <= 2 * naive_error.mean() + half_ulp.mean()


@pytest.mark.parametrize("implementation", [None, "reference", *COMPILED])
def test_dense_is_deterministic(implementation, rng):
    x = tf.constant(rng.standard_normal((257, 300)), tf.float32)
    w = tf.constant(rng.standard_normal((300, 129)), tf.float32)
    first = kernels.dense(x, w, implementation=implementation).numpy()
    second = kernels.dense(x, w, implementation=implementation).numpy()
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("implementation", [None, "reference", *COMPILED])
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_stay_in_their_row(implementation, poison, rng):
    x = rng.standard_normal((6, 5)).astype("float32")
    x[2, 3] = poison
    w = rng.standard_normal((5, 4)).astype("float32")
    y = kernels.dense(tf.constant(x), tf.constant(w), implementation=implementation).numpy()
    with np.errstate(invalid="ignore"):
        expected = x.astype(np.float64) @ w
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(expected))
    clean = np.delete(np.arange(6), 2)
    assert np.isfinite(y[clean]).all()
    tolerance("float32").check(y[clean], expected[clean])


# --- the tutorial kernels: random shapes and arguments, every implementation ---------

from oracles import center_zero_oracle, pool_oracle  # noqa: E402

small = st.integers(0, 9)
windows = st.tuples(st.integers(1, 4), st.integers(1, 4))


@st.composite
def pooling_problems(draw):
    pool, strides = draw(windows), draw(windows)
    padding = draw(st.sampled_from(["valid", "same"]))
    h = draw(st.integers(pool[0] if padding == "valid" else 1, 12))
    w = draw(st.integers(pool[1] if padding == "valid" else 1, 12))
    data_format = draw(st.sampled_from(["channels_last", "channels_first"]))
    shape = (draw(small), h, w, draw(st.integers(0, 3)))
    if data_format == "channels_first":
        shape = (shape[0], shape[3], h, w)
    x = np.random.default_rng(draw(st.integers(0, 2**31 - 1))).standard_normal(shape)
    return x, pool, strides, padding, data_format


@QUICK
@given(pooling_problems(), float_dtypes)
def test_max_pool2d_paths_agree(problem, dtype):
    x, pool, strides, padding, data_format = problem
    x = round_to(x, dtype)
    expected, _ = pool_oracle(x, pool, strides, padding, data_format)
    for implementation in (None, "reference", *COMPILED):
        y = kernels.max_pool2d(tf.constant(x, dtype), pool, strides, padding, data_format,
                               implementation=implementation)
        # a maximum is one of its inputs: every path is exact
        np.testing.assert_array_equal(y.numpy().astype(np.float64), expected, err_msg=str(implementation))


@QUICK
@given(st.lists(small, min_size=3, max_size=4), windows, float_dtypes, st.integers(0, 2**31 - 1))
def test_center_zero_and_fixed_mask_paths_agree(shape, size, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = [*shape[:-2], max(shape[-2], size[0]), max(shape[-1], size[1])]
    x = round_to(rng.standard_normal(shape), dtype)
    mask = round_to(rng.standard_normal(shape[-2:]), dtype)
    for implementation in (None, "reference", *COMPILED):
        zeroed = kernels.center_zero(tf.constant(x, dtype), size, implementation=implementation)
        np.testing.assert_array_equal(zeroed.numpy().astype(np.float64), center_zero_oracle(x, size))
        masked = kernels.fixed_mask(tf.constant(x, dtype), tf.constant(mask, dtype),
                                    implementation=implementation)
        tolerance(dtype).check(masked.numpy().astype(np.float64), x * mask)


@QUICK
@given(st.lists(sizes, min_size=1, max_size=3).filter(lambda s: np.prod(s) <= 20000), float_dtypes,
       st.integers(0, 2**31 - 1))
def test_exponential_paths_agree(shape, dtype, seed):
    x = round_to(np.random.default_rng(seed).uniform(-8, 8, shape), dtype)
    for implementation in (None, "reference", *COMPILED):
        y = kernels.exponential(tf.constant(x, dtype), implementation=implementation)
        tolerance(dtype).check(y.numpy().astype(np.float64) / np.exp(x), np.ones_like(x),
                               what=f"{implementation} exp(x) / numpy exp(x)")


@QUICK
@given(st.lists(small, min_size=1, max_size=3), sizes, sizes, float_dtypes, st.integers(0, 2**31 - 1))
def test_residual_projection_paths_agree(leading, k, n, dtype, seed):
    rng = np.random.default_rng(seed)
    a, b = (round_to(rng.standard_normal((*leading, d)), dtype) for d in (k, n))
    kernel = round_to(rng.standard_normal((k, n)) / np.sqrt(max(k, 1)), dtype)
    for implementation in (None, "reference", *COMPILED):
        y, mean = kernels.residual_projection(tf.constant(a, dtype), tf.constant(b, dtype),
                                              tf.constant(kernel, dtype), implementation=implementation)
        tolerance(dtype).check(y.numpy().astype(np.float64), np.tensordot(a, kernel, 1) + b)
        tolerance(dtype).check(mean.numpy().astype(np.float64), b.mean(-1))


# --- attention: random shapes, masks, biases and implementations -----------------------

from attention_cases import check_gradients_match_reference, to_tensors  # noqa: E402
from oracles import attention_oracle, pooling_oracle  # noqa: E402

lengths = st.one_of(st.sampled_from([0, 1, 2, 7]), st.integers(0, 40))


@st.composite
def attention_problems(draw):
    """Inputs (float64) and options of one ``dot_product_attention`` call.

    Masks take every broadcast form, with some rows of every key masked; the tiles
    are at times smaller than the lengths, so the compiled paths walk several blocks.
    """
    b, t, s = draw(st.integers(0, 3)), draw(lengths), draw(lengths)
    kv_heads = draw(st.integers(1, 2))
    n = kv_heads * draw(st.integers(1, 3))
    h = draw(st.sampled_from([0, 1, 3, 8]))
    d = draw(st.sampled_from([h, 5, 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    q, k, v = (rng.standard_normal(shape) for shape in ((b, t, n, h), (b, s, kv_heads, h), (b, s, kv_heads, d)))
    # With H = 0 the default scale 1/sqrt(H) is undefined: a scale is required.
    options = {"is_causal": draw(st.booleans()), "scale": 0.3 if h == 0 else draw(st.sampled_from([None, 0.3]))}
    mask_shape = draw(st.sampled_from([None, (b, 1, 1, s), (b, n, t, s), (t, s), (1, n, t, 1)]))
    if mask_shape is not None:
        mask = rng.random(mask_shape) < draw(st.sampled_from([0.3, 0.8]))
        if mask_shape[-2] == t > 0:
            mask[..., draw(st.integers(0, t - 1)), :] = False  # a row that sees no key
        options["mask"] = mask
    bias_shape = draw(st.sampled_from([None, (1, n, t, s), (b, 1, 1, s), (t, s)]))
    if bias_shape is not None:
        options["bias"] = rng.standard_normal(bias_shape)
    blocks = draw(st.sampled_from([None, kernels.BlockSizes(4, 8), kernels.BlockSizes(16, 3)]))
    return q, k, v, options, blocks


def _check_attention(problem, dtype):
    q, k, v, options, blocks = problem
    q, k, v = (round_to(a, dtype) for a in (q, k, v))
    options = dict(options)
    if "bias" in options:
        options["bias"] = round_to(options["bias"], dtype)
    expected = attention_oracle(q, k, v, **options)
    b, t, n, _ = q.shape
    valid = np.ones((b, n, t, k.shape[1]), bool)
    if "mask" in options:
        valid &= options["mask"]
    if options["is_causal"]:
        valid &= np.tril(np.ones(valid.shape[-2:], bool))
    sees_nothing = ~valid.any(axis=-1).transpose(0, 2, 1)  # [B, T, N]
    call = {key: tf.constant(value, dtype) if key == "bias" else value for key, value in options.items()}
    results = {}
    for implementation in ("reference", None, *COMPILED):
        out = kernels.dot_product_attention(*(tf.constant(a, dtype) for a in (q, k, v)), **call,
                                            block_sizes=blocks, implementation=implementation)
        assert out.dtype == tf.as_dtype(dtype) and out.shape == expected.shape
        results[implementation] = out.numpy().astype(np.float64)
        assert np.isfinite(results[implementation]).all(), implementation
        # a query row that sees no key attends to nothing: exactly zero
        np.testing.assert_array_equal(results[implementation][sees_nothing], 0.0)
    tolerance(dtype).check(results["reference"], expected, what="reference vs numpy")
    for implementation in (None, *COMPILED):
        tolerance(dtype).check(results[implementation], results["reference"],
                               what=f"{implementation} vs reference")


@QUICK_ATTENTION
@given(attention_problems(), float_dtypes)
def test_dot_product_attention_paths_agree(problem, dtype):
    _check_attention(problem, dtype)


@pytest.mark.slow
@LONG
@given(attention_problems(), float_dtypes)
def test_dot_product_attention_paths_agree_long(problem, dtype):
    _check_attention(problem, dtype)


def _broadcast_form(draw, full):
    """A shape that broadcasts to ``full`` ([B, N, T, S]): each axis 1 or full size,
    and at times the leading size-1 axes left out (rank < 4)."""
    shape = tuple(size if draw(st.booleans()) else 1 for size in full)
    leading_ones = next((axis for axis, size in enumerate(shape) if size != 1), len(shape))
    return shape[draw(st.integers(0, leading_ones)):]


@st.composite
def attention_gradient_problems(draw):
    """Inputs (float64), options and a cotangent of one differentiated call.

    Mask and bias take any of the 16 forms [B|1, N|1, T|1, S|1] (and shorter ranks;
    test_attention_kernel runs each form for certain); tiles of 1 to 8 rows and
    columns, so both lengths span several blocks and mostly end mid-block; dropout at
    times, with a seed.
    """
    b, t, s = draw(st.integers(0, 3)), draw(st.integers(0, 20)), draw(st.integers(0, 20))
    kv_heads = draw(st.integers(1, 2))
    n = kv_heads * draw(st.integers(1, 3))
    h = draw(st.sampled_from([1, 4]))
    d = draw(st.sampled_from([h, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    q, k, v = (rng.standard_normal(shape) for shape in ((b, t, n, h), (b, s, kv_heads, h), (b, s, kv_heads, d)))
    options = {"is_causal": draw(st.booleans()), "scale": draw(st.sampled_from([None, 0.3]))}
    if draw(st.booleans()):
        mask = rng.random(_broadcast_form(draw, (b, n, t, s))) < draw(st.sampled_from([0.3, 0.8]))
        if mask.ndim >= 2 and mask.shape[-2] == t > 0:
            mask[..., draw(st.integers(0, t - 1)), :] = False  # a row that sees no key
        options["mask"] = mask
    if draw(st.booleans()):
        options["bias"] = rng.standard_normal(_broadcast_form(draw, (b, n, t, s)))
    if draw(st.booleans()):
        options.update(dropout_rate=0.3, seed=draw(st.integers(0, 2**31 - 1)))
    blocks = kernels.BlockSizes(draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    cotangent = rng.standard_normal((b, t, n, d))
    return q, k, v, options, blocks, cotangent


def _check_attention_gradients(problem):
    q, k, v, options, blocks, cotangent = problem
    tensors, kwargs = to_tensors("float32", q, k, v, options)
    weights = tf.constant(cotangent, tf.float32)
    for implementation in COMPILED:
        check_gradients_match_reference(implementation, tensors, kwargs, weights, blocks)


@QUICK_GRADIENTS
@given(attention_gradient_problems())
def test_dot_product_attention_gradients_agree(problem):
    _check_attention_gradients(problem)


@pytest.mark.slow
@LONG
@given(attention_gradient_problems())
def test_dot_product_attention_gradients_agree_long(problem):
    _check_attention_gradients(problem)


def _check_attention_pooling(shape, per_step_bias, mask_kind, dtype, seed):
    b, t, f = shape
    rng = np.random.default_rng(seed)
    x = round_to(rng.standard_normal((b, t, f)), dtype)
    weight = round_to(rng.standard_normal((f, 1)), dtype)
    bias = round_to(rng.standard_normal((t, 1) if per_step_bias else (1,)), dtype)
    mask = None
    if mask_kind != "none":
        mask = rng.random((b, t)) < 0.6
        if mask_kind == "with_empty_rows" and b > 0:
            mask[rng.integers(0, b)] = False
    expected = pooling_oracle(x, weight, bias, mask)
    reference = None
    for implementation in ("reference", None, *COMPILED):
        out = kernels.attention_pooling(
            *(tf.constant(a, dtype) for a in (x, weight, bias)),
            None if mask is None else tf.constant(mask), implementation=implementation,
        ).numpy().astype(np.float64)
        assert np.isfinite(out).all(), implementation
        if mask is not None:
            np.testing.assert_array_equal(out[~mask.any(axis=1)], 0.0)
        if reference is None:
            reference = out
            tolerance(dtype).check(reference, expected, what="reference vs numpy")
        else:
            tolerance(dtype).check(out, reference, what=f"{implementation} vs reference")


pooling_shapes = st.tuples(st.integers(0, 5), lengths, st.sampled_from([0, 1, 2, 7, 16]))
mask_kinds = st.sampled_from(["none", "random", "with_empty_rows"])


@QUICK
@given(pooling_shapes, st.booleans(), mask_kinds, float_dtypes, st.integers(0, 2**31 - 1))
def test_attention_pooling_paths_agree(shape, per_step_bias, mask_kind, dtype, seed):
    _check_attention_pooling(shape, per_step_bias, mask_kind, dtype, seed)


@pytest.mark.slow
@LONG
@given(pooling_shapes, st.booleans(), mask_kinds, float_dtypes, st.integers(0, 2**31 - 1))
def test_attention_pooling_paths_agree_long(shape, per_step_bias, mask_kind, dtype, seed):
    _check_attention_pooling(shape, per_step_bias, mask_kind, dtype, seed)


def _naive_low_precision_attention(q, k, v, dtype):
    """softmax(Q·Kᵀ·scale)·V with every product, partial sum and softmax step rounded
    to ``dtype``: the accuracy floor to beat."""
    rounded = lambda a: round_to(a, dtype)  # noqa: E731
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    out = np.zeros((b, t, n, v.shape[-1]))
    scale = rounded(1.0 / np.sqrt(h))
    for i in range(b):
        for j in range(n):
            logits = _naive_low_precision_dense(q[i, :, j], k[i, :, j // groups].T, 0.0, dtype)
            logits = rounded(logits * scale)
            weights = rounded(np.exp(rounded(logits - logits.max(axis=-1, keepdims=True))))
            total = np.zeros((t, 1))
            for column in weights.T:
                total = rounded(total + column[:, None])
            probs = rounded(weights / total)
            out[i, :, j] = _naive_low_precision_dense(probs, v[i, :, j // groups], 0.0, dtype)
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_attention_error_is_at_most_twice_the_naive_error(dtype, rng):
    t, s, h = 19, 203, 64
    q, k, v = (round_to(rng.standard_normal(shape), dtype) for shape in ((2, t, 2, h), (2, s, 1, h), (2, s, 1, h)))
    truth = attention_oracle(q, k, v)
    naive = _naive_low_precision_attention(q, k, v, dtype)
    naive_error = np.abs(naive - truth)
    half_ulp = np.abs(truth) * float(ml_dtypes.finfo(NUMPY_DTYPES[dtype]).eps) / 2
    for implementation in (None, "reference", *COMPILED):
        fast = kernels.dot_product_attention(*(tf.constant(a, dtype) for a in (q, k, v)),
                                             implementation=implementation).numpy().astype(np.float64)
        fast_error = np.abs(fast - truth)
        print(f"{dtype} {implementation} T={t} S={s} H={h}: fast max {fast_error.max():.3g} "
              f"mean {fast_error.mean():.3g}; naive max {naive_error.max():.3g} mean {naive_error.mean():.3g}")
        assert fast_error.max() <= 2 * naive_error.max() + half_ulp.max(), implementation
        assert fast_error.mean() <= 2 * naive_error.mean() + half_ulp.mean(), implementation
