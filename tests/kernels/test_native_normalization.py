"""The native normalization op against numpy and the compiled path: trailing axes of
every size (vector bodies and tails), every dtype, the statistics' options, both ISAs,
gradients, empty inputs, bad input at the op and at the kernel, and what auto runs
(the table's native op eagerly at every size, XLA under a tape or inside XLA)."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import round_to
from oracles import layer_norm_oracle, rms_norm_oracle

from fastlayers import kernels
from fastlayers.kernels import dispatch, normalization, tolerance
from fastlayers.kernels.native import attention as native_attention
from fastlayers.kernels.native import build as build_lib

DTYPES = ("float32", "float16", "bfloat16")
# Trailing axes only; D of 1, 7, 40 and 1027 exercise the AVX2 bodies of 32 and 8
# floats and their scalar tails.
# Every axis of the input (one row) too.
CASES = [(-1, (3, 1)), (-1, (2, 7)), (-1, (3, 5, 40)), ([1, 2], (3, 5, 8)), (-1, (4, 1027)),
         ([0, 1], (3, 8)), (0, (40,))]


def _layer(x, gamma, beta, axis, implementation, **options):
    return normalization.layer_normalization(
        x, gamma, beta, axis=axis, epsilon=1e-3, implementation=implementation, **options
    )


def _raw(x, gamma=None, beta=None, **attrs):
    empty = tf.zeros([0])
    return native_attention.load_library().fastlayers_normalization(
        x, empty if gamma is None else gamma, empty if beta is None else beta, **attrs
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis,shape", CASES, ids=str)
def test_matches_numpy(rng, dtype, axis, shape):
    x = rng.standard_normal(shape) * 3 + 1
    axes = [a % len(shape) for a in (axis if isinstance(axis, list) else [axis])]
    gamma = rng.uniform(0.5, 2.0, [shape[a] for a in axes])
    beta = rng.standard_normal(gamma.shape)
    xt = tf.constant(round_to(x, dtype), dtype)
    xr = round_to(x, dtype)
    for rms_scaling in (False, True):
        actual = _layer(xt, gamma, beta, axis, "native", rms_scaling=rms_scaling)
        assert actual.dtype == xt.dtype
        expected = layer_norm_oracle(xr, gamma, beta, axis, 1e-3, rms_scaling)
        tolerance(dtype).check(actual, expected, what=f"layer_normalization {rms_scaling=}")
    actual = normalization.rms_normalization(xt, gamma, axis=axis, implementation="native")
    tolerance(dtype).check(actual, rms_norm_oracle(xr, gamma, axis, 1e-6), what="rms_normalization")


@pytest.mark.parametrize("weights", ["neither", "gamma", "beta"])
def test_absent_scale_or_offset(rng, weights):
    x = rng.standard_normal((6, 40)) * 2
    gamma = rng.uniform(0.5, 2.0, 40) if weights == "gamma" else None
    beta = rng.standard_normal(40) if weights == "beta" else None
    actual = _layer(tf.constant(x, tf.float32), gamma, beta, -1, "native")
    tolerance("float32").check(actual, layer_norm_oracle(round_to(x, "float32"), gamma, beta, -1, 1e-3))
    actual = normalization.rms_normalization(tf.constant(x, tf.float32), gamma, implementation="native")
    tolerance("float32").check(actual, rms_norm_oracle(round_to(x, "float32"), gamma, -1, 1e-6))


def test_full_rank_weight_is_taken(rng):
    x = rng.standard_normal((2, 3, 16))
    gamma = rng.uniform(0.5, 2.0, (1, 1, 16))
    actual = _layer(tf.constant(x, tf.float32), gamma, None, -1, "native")
    expected = layer_norm_oracle(round_to(x, "float32"), gamma.reshape(16), None, -1, 1e-3)
    tolerance("float32").check(actual, expected)


def test_variance_does_not_cancel_when_the_mean_is_large(rng):
    # mean(x²) - mean² would lose every digit of a spread of 1e-2 around 1e4.
    x = 1e4 + rng.standard_normal((4, 256)) * 1e-2
    actual = _layer(tf.constant(x, tf.float32), None, None, -1, "native")
    expected = layer_norm_oracle(round_to(x, "float32"), None, None, -1, 1e-3)
    np.testing.assert_allclose(actual, expected, atol=0.05)


@pytest.mark.parametrize("attrs", [
    dict(centered=True, subtract_mean=True),
    dict(centered=True, subtract_mean=False),
    dict(centered=False, subtract_mean=False),
], ids=str)
def test_portable_and_avx2_primitives_agree(rng, attrs):
    x = tf.constant(rng.standard_normal((9, 1027)) * 2 + 1, tf.float32)
    gamma = tf.constant(rng.uniform(0.5, 2.0, 1027), tf.float32)
    beta = tf.constant(rng.standard_normal(1027), tf.float32)
    best = _raw(x, gamma, beta, epsilon=1e-3, **attrs)
    portable = _raw(x, gamma, beta, epsilon=1e-3, isa="portable", **attrs)
    tolerance("float32").check(best, portable, what=f"avx2 against portable {attrs}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("axis,shape", [(-1, (3, 40)), ([1, 2], (2, 3, 8))], ids=str)
def test_gradients_match_the_compiled_path(rng, dtype, axis, shape):
    x = tf.constant(rng.standard_normal(shape), dtype)
    size = [shape[a % len(shape)] for a in (axis if isinstance(axis, list) else [axis])]
    gamma = tf.constant(rng.uniform(0.5, 2.0, size), tf.float32)
    beta = tf.constant(rng.standard_normal(size), tf.float32)
    upstream = tf.constant(rng.standard_normal(shape), dtype)

    def gradients(implementation):
        found = []
        for kernel, weights in ((normalization.layer_normalization, (gamma, beta)),
                                (normalization.rms_normalization, (gamma,))):
            with tf.GradientTape() as tape:
                tape.watch([x, *weights])
                y = kernel(x, *weights, axis=axis, implementation=implementation)
            found += tape.gradient(y, [x, *weights], output_gradients=upstream)
        return found

    for native, xla in zip(gradients("native"), gradients("xla"), strict=True):
        tolerance(dtype, grad=True).check(native, xla, what="gradient")


def test_gradient_with_neither_weight_and_inside_a_function(rng):
    x = tf.constant(rng.standard_normal((4, 24)), tf.float32)

    @tf.function
    def gradient(x, implementation):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = normalization.layer_normalization(x, implementation=implementation)
            loss = tf.reduce_sum(y * tf.range(24.0))
        return tape.gradient(loss, x)

    tolerance("float32", grad=True).check(gradient(x, "native"), gradient(x, "xla"))


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0, 2, 8), (2, 3, 0), (2, 0, 4)], ids=str)
def test_empty_inputs(shape):
    x = tf.zeros(shape)
    for axis in (-1, [1, 2] if len(shape) == 3 else [0, 1]):
        assert normalization.layer_normalization(x, axis=axis, implementation="native").shape == shape
        assert normalization.rms_normalization(x, axis=axis, implementation="native").shape == shape


def test_a_shape_generic_trace_takes_empty_and_full_inputs(rng):
    @tf.function(input_signature=[tf.TensorSpec([None, None, 8], tf.float32)])
    def run(x):
        return normalization.layer_normalization(x, axis=[1, 2], implementation="native")

    for shape in [(0, 3, 8), (2, 0, 8)]:
        assert run(tf.zeros(shape)).shape == shape
    x = rng.standard_normal((2, 3, 8))
    expected = layer_norm_oracle(round_to(x, "float32"), None, None, [1, 2], 1e-3)
    tolerance("float32").check(run(tf.constant(x, tf.float32)), expected)
    assert run.experimental_get_tracing_count() == 1


def test_leading_axes_are_refused_by_name():
    with pytest.raises(ValueError, match=r"implementation='native' cannot run kernel "
                       r"'layer_normalization'.*trailing axes only.*axis=\(-2,\)"):
        normalization.layer_normalization(tf.ones((2, 3, 4)), axis=1, implementation="native")
    with pytest.raises(ValueError, match=r"'rms_normalization'.*trailing axes only.*axis=\(-3, -1\)"):
        normalization.rms_normalization(tf.ones((2, 3, 4)), axis=[0, 2], implementation="native")


def test_float64_is_refused_by_name():
    with pytest.raises(ValueError, match=r"takes float32, float16 or bfloat16, not float64"):
        normalization.layer_normalization(tf.ones((2, 4), tf.float64), implementation="native")


def test_bad_input_at_the_op_is_an_error_not_a_crash():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"x must have rank 2 \[R, D\]"):
        _raw(tf.ones((2,)), epsilon=1e-3, centered=True, subtract_mean=True)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"gamma must have shape \[0\] \(absent\) or \[D\] = \[4\].*gamma.shape=\[3\]"):
        _raw(tf.ones((2, 4)), tf.ones((3,)), epsilon=1e-3, centered=True, subtract_mean=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"beta must have shape.*beta.shape=\[2,4\]"):
        _raw(tf.ones((2, 4)), None, tf.ones((2, 4)), epsilon=1e-3, centered=True, subtract_mean=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"epsilon must be a non-negative number"):
        _raw(tf.ones((2, 4)), epsilon=-1.0, centered=True, subtract_mean=True)


def _recorded(call):
    with dispatch.recording() as calls:
        call()
    return [(c.kernel.name, c.selection.implementation, c.selection.source) for c in calls]


def test_auto_runs_the_native_op_eagerly_at_every_size():
    # Far below the matmul threshold, where auto used to take the reference: the
    # op alone costs less than the reference's eager ops from one row up.
    for rows in (1, 16, 1024):
        x = tf.ones((rows, 64))
        assert _recorded(lambda: kernels.layer_normalization(x)) == [
            ("layer_normalization", "native", "table")]
        assert _recorded(lambda: kernels.rms_normalization(x)) == [
            ("rms_normalization", "native", "table")]


def test_auto_trains_and_compiles_with_xla():
    x = tf.ones((4, 64))
    with tf.GradientTape() as tape:
        tape.watch(x)
        recorded = _recorded(lambda: kernels.rms_normalization(x))
    assert recorded == [("rms_normalization", "xla", "table")]
    compiled = tf.function(lambda x: kernels.layer_normalization(x), jit_compile=True)
    assert _recorded(lambda: compiled(x)) == [("layer_normalization", "xla", "table")]
    # Leading axes: the native op refuses, the table's next entry runs.
    assert _recorded(lambda: kernels.layer_normalization(tf.ones((2, 3, 4)), axis=1)) == [
        ("layer_normalization", "xla", "table")]


def test_one_library_holds_both_ops_and_its_key_covers_every_source(monkeypatch, tmp_path):
    library = native_attention.load_library()
    assert hasattr(library, "fastlayers_normalization")
    assert hasattr(library, "fastlayers_attention_forward")
    monkeypatch.setenv("FASTLAYERS_CACHE_DIR", str(tmp_path))
    first = build_lib.plan().directory
    for name in ("SOURCES", "HEADERS"):
        files = getattr(build_lib, name)
        changed = tmp_path / files[-1].name
        changed.write_bytes(files[-1].read_bytes() + b"\n// changed\n")
        monkeypatch.setattr(build_lib, name, files[:-1] + (changed,))
        assert build_lib.plan().directory != first, f"a changed {changed.name} keeps the key"
        monkeypatch.setattr(build_lib, name, files)
    assert build_lib.plan().directory == first


def test_without_the_library_auto_takes_xla_and_an_explicit_request_says_why(monkeypatch):
    monkeypatch.setattr(build_lib, "_failure", "compiling normalization.cc failed (exit 1)")
    # the once-per-process warning, given already
    monkeypatch.setattr(build_lib, "_warned", {"the native normalization kernel"})
    x = tf.ones((4, 64))
    assert _recorded(lambda: kernels.layer_normalization(x)) == [
        ("layer_normalization", "xla", "table")]
    with pytest.raises(ValueError, match=r"'native' cannot run kernel 'rms_normalization'.*"
                       r"could not be built: compiling normalization.cc failed"):
        normalization.rms_normalization(x, implementation="native")
