"""The native int8 Dense op (kernels/native/dense_int8.cc): Keras's int8 scheme with
exact int32 sums, bit-equal to an op-by-op numpy oracle, on every size and ISA."""

import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from fastlayers import kernels, layers
from fastlayers.kernels.dense import DENSE_INT8, dense_int8_reference
from fastlayers.kernels.native import build as build_lib
from fastlayers.kernels.native import dense_int8 as native_int8

ISAS = ("best", "portable")


def int8_oracle(x, kernel_q, kernel_scale, bias=None, relu=False, epsilon=1e-7):
    """Keras's int8 Dense, each float32 step as TensorFlow rounds it, with int64 sums."""
    f32 = np.float32
    scale = f32(127) / (np.abs(x).max(axis=-1, keepdims=True, initial=-np.inf) + f32(epsilon))
    x_q = np.clip(np.round(x * scale), -127, 127).astype(np.int64)
    sums = x_q @ kernel_q.astype(np.int64)
    y = sums.astype(f32) / (kernel_scale.astype(f32) * scale)
    if bias is not None:
        y = y + bias
    return np.maximum(y, f32(0)) if relu else y


def _case(rng, m, k, n):
    x = rng.standard_normal((m, k)).astype(np.float32)
    kernel_q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    kernel_scale = rng.uniform(0.5, 200.0, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return x, kernel_q, kernel_scale, bias


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "m, k, n",
    [(1, 1, 1), (1, 1024, 1), (7, 33, 17), (13, 64, 300), (100, 257, 33), (97, 1000, 260), (6, 2, 16)],
)
def test_bit_equal_to_the_oracle(rng, isa, m, k, n):
    x, kernel_q, kernel_scale, bias = _case(rng, m, k, n)
    x[0, : k // 2] = 0.0
    y = native_int8.dense_int8_native(
        x, kernel_q, kernel_scale, bias, epsilon=1e-7, activation=keras.activations.relu, isa=isa
    )
    np.testing.assert_array_equal(y.numpy(), int8_oracle(x, kernel_q, kernel_scale, bias, relu=True))


@pytest.mark.parametrize("isa", ISAS)
def test_sums_past_int16_do_not_saturate(isa):
    # Every product is ±127·127: pair sums reach ±32258, next to int16's limit.
    k, n = 1000, 24
    x = np.ones((8, k), np.float32)
    x[1] *= -1.0
    kernel_q = np.full((k, n), 127, np.int8)
    kernel_q[:, 1::2] = -127
    kernel_scale = np.ones(n, np.float32)
    y = native_int8.dense_int8_native(x, kernel_q, kernel_scale, epsilon=1e-7, isa=isa).numpy()
    np.testing.assert_array_equal(y, int8_oracle(x, kernel_q, kernel_scale))
    scale = np.float32(127) / (np.float32(1) + np.float32(1e-7))
    assert y[0, 0] == np.float32(127 * 127 * k) / scale


def _extreme_case(rng, m=7, k=4099, n=40):
    """Inputs that quantize to ±127 everywhere and a kernel of ±127 and -128 (any int8
    a kernel can hold), signs mixed: pair sums of products reach their largest
    magnitudes, so a product with a wrong sign or a saturated pair sum shows."""
    x = rng.choice(np.float32([-1.0, 1.0]), (m, k))
    x[0], x[1] = 1.0, -1.0
    kernel_q = rng.choice(np.int8([-128, -127, 127]), (k, n))
    kernel_q[:, 0], kernel_q[:, 1], kernel_q[:, 2] = 127, -127, -128
    kernel_q[:, 3] = np.where(x[2] > 0, 127, -127)  # row 2 · column 3: +127·127·K
    kernel_q[:, 4] = np.where(x[3] > 0, -128, 127)  # row 3 · column 4: all negative
    kernel_q[:, 5] = 127
    kernel_q[1::2, 5] = 0
    return x, kernel_q


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_operands_are_exact(rng, isa):
    x, kernel_q = _extreme_case(rng)
    k = x.shape[1]
    kernel_scale = np.ones(kernel_q.shape[1], np.float32)
    y = native_int8.dense_int8_native(x, kernel_q, kernel_scale, epsilon=1e-7, isa=isa).numpy()
    np.testing.assert_array_equal(y, int8_oracle(x, kernel_q, kernel_scale))
    scale = np.float32(127) / (np.float32(1) + np.float32(1e-7))
    negative = int((x[3] < 0).sum())
    for (row, column), sum_ in {(0, 2): -128 * 127 * k, (1, 2): 128 * 127 * k, (2, 3): 127 * 127 * k,
                                (3, 4): -128 * 127 * (k - negative) - 127 * 127 * negative,
                                (0, 5): 127 * 127 * (k // 2 + 1)}.items():
        assert y[row, column] == np.float32(sum_) / scale, (row, column)


def test_extreme_operands_match_keras_and_the_portable_isa(rng):
    ours = layers.Dense(40, bias_initializer="random_normal", implementation="native")
    theirs = keras.layers.Dense(40, bias_initializer="random_normal")
    for layer in (ours, theirs):
        layer.build((None, 4099))
    theirs.set_weights(ours.get_weights())
    x, kernel_q = _extreme_case(rng)
    for layer in (ours, theirs):
        layer.quantize("int8")
        layer._kernel.assign(kernel_q)
    expected = np.asarray(theirs(x))
    np.testing.assert_array_equal(np.asarray(ours(x)), expected)
    portable = native_int8.dense_int8_native(
        x, kernel_q, ours.kernel_scale, ours.bias, epsilon=ours.inputs_quantizer.epsilon, isa="portable"
    )
    np.testing.assert_array_equal(portable.numpy(), expected)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, k, n", [(0, 5, 7), (5, 0, 7), (5, 7, 0), (0, 0, 0)])
def test_empty_axes_match_the_reference(rng, isa, m, k, n):
    x, kernel_q, kernel_scale, bias = _case(rng, m, k, n)
    y = native_int8.dense_int8_native(x, kernel_q, kernel_scale, bias, epsilon=1e-7, isa=isa)
    expected = dense_int8_reference(tf.constant(x), kernel_q, kernel_scale, tf.constant(bias), epsilon=1e-7)
    assert y.shape == (m, n)
    # K = 0 gives Keras's NaN (0 / (scale · 127 / -inf)), as the reference.
    np.testing.assert_array_equal(y.numpy(), expected.numpy())


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "softmax"])
def test_activations_and_leading_axes_match_the_reference(rng, activation):
    x, kernel_q, kernel_scale, bias = _case(rng, 12, 40, 24)
    x = x.reshape(3, 4, 40)
    fn = keras.activations.get(activation)
    y = kernels.dense_int8(x, kernel_q, kernel_scale, bias, activation=fn, implementation="native")
    expected = kernels.dense_int8(x, kernel_q, kernel_scale, bias, activation=fn, implementation="reference")
    assert y.shape == (3, 4, 24)
    np.testing.assert_array_equal(y.numpy(), expected.numpy())


def test_traced_with_unknown_sizes(rng):
    x, kernel_q, kernel_scale, bias = _case(rng, 10, 9, 5)
    run = tf.function(
        lambda x: kernels.dense_int8(x, kernel_q, kernel_scale, bias, implementation="native"),
        input_signature=[tf.TensorSpec([None, None, 9], tf.float32)],
    )
    y = run(x.reshape(2, 5, 9))
    assert y.shape == (2, 5, 5)
    np.testing.assert_array_equal(y.numpy().reshape(10, 5), int8_oracle(x, kernel_q, kernel_scale, bias))


def test_gradients_are_the_references(rng):
    x, kernel_q, kernel_scale, bias = _case(rng, 6, 20, 12)
    x, bias = tf.constant(x), tf.constant(bias)

    def gradients(implementation):
        with tf.GradientTape() as tape:
            tape.watch([x, bias])
            y = kernels.dense_int8(
                x, kernel_q, kernel_scale, bias, activation=keras.activations.relu, implementation=implementation
            )
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, bias])

    for mine, reference in zip(gradients("native"), gradients("reference")):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)


def test_threads_give_identical_outputs(rng, tmp_path):
    x, kernel_q, kernel_scale, bias = _case(rng, 301, 129, 300)
    np.savez(tmp_path / "case.npz", x=x, kernel_q=kernel_q, kernel_scale=kernel_scale, bias=bias)
    script = textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(1)
        from fastlayers.kernels.native import dense_int8
        case = np.load({str(tmp_path / "case.npz")!r})
        y = dense_int8.dense_int8_native(case["x"], case["kernel_q"], case["kernel_scale"], case["bias"], epsilon=1e-7)
        np.save({str(tmp_path / "one_thread.npy")!r}, y.numpy())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    two_threads = native_int8.dense_int8_native(x, kernel_q, kernel_scale, bias, epsilon=1e-7).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "one_thread.npy"), two_threads)


def test_a_kernel_assigned_in_place_is_packed_again(rng):
    x, kernel_q, kernel_scale, bias = _case(rng, 9, 70, 40)
    variable = tf.Variable(kernel_q)
    run = tf.function(lambda x: kernels.dense_int8(x, variable, kernel_scale, bias, implementation="native"))
    np.testing.assert_array_equal(run(x).numpy(), int8_oracle(x, kernel_q, kernel_scale, bias))
    assert native_int8.cached_kernels() >= 1
    for changed in (np.flip(kernel_q, axis=0), kernel_q.copy()):
        changed[3, 5] = -changed[3, 5] if changed[3, 5] else 7
        variable.assign(changed)
        np.testing.assert_array_equal(run(x).numpy(), int8_oracle(x, changed, kernel_scale, bias))
        eager = kernels.dense_int8(x, variable, kernel_scale, bias, implementation="native")
        np.testing.assert_array_equal(eager.numpy(), int8_oracle(x, changed, kernel_scale, bias))


def test_two_kernels_of_one_shape_alternate(rng):
    x, first, kernel_scale, bias = _case(rng, 8, 32, 16)
    second = rng.integers(-127, 128, first.shape).astype(np.int8)
    for _ in range(2):
        for kernel_q in (first, second):
            y = kernels.dense_int8(x, kernel_q, kernel_scale, bias, implementation="native")
            np.testing.assert_array_equal(y.numpy(), int8_oracle(x, kernel_q, kernel_scale, bias))


def test_auto_runs_native_for_float32_on_cpu_and_xla_elsewhere():
    def choice(implementation, dtype=tf.float32):
        return DENSE_INT8.select(implementation, platform="cpu", dtype=dtype, epsilon=1e-7).implementation

    assert choice(None) == "native"
    assert choice(None, tf.bfloat16) == "xla"
    assert DENSE_INT8.not_supported_reasons("native", platform="cpu", dtype=tf.bfloat16, epsilon=1e-7) == [
        "the native int8 kernel takes float32 inputs, not bfloat16 (Keras quantizes other dtypes in "
        "their own precision)"
    ]
    assert "runs on CPU only" in DENSE_INT8.not_supported_reasons(
        "native", platform="gpu", dtype=tf.float32, epsilon=1e-7
    )[0]


def test_native_is_refused_inside_an_xla_cluster(rng):
    x, kernel_q, kernel_scale, bias = _case(rng, 4, 8, 8)
    explicit = tf.function(
        lambda x: kernels.dense_int8(x, kernel_q, kernel_scale, bias, implementation="native"), jit_compile=True
    )
    with pytest.raises(ValueError, match=r"implementation='native' cannot run kernel 'dense_int8'.*inside an XLA cluster"):
        explicit(x)
    auto = tf.function(lambda x: kernels.dense_int8(x, kernel_q, kernel_scale, bias), jit_compile=True)
    np.testing.assert_allclose(auto(x).numpy(), int8_oracle(x, kernel_q, kernel_scale, bias), rtol=1e-6)


def best_isa():
    """The ISA the op should choose here, from what /proc/cpuinfo reports: AVX512-VNNI
    in a build that emulates AVX-512 or on a CPU with it, else AVX2 where there is."""
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split())
    if "-DFASTLAYERS_EMULATE_AVX512" in os.environ.get("FASTLAYERS_NATIVE_CXXFLAGS", ""):
        return "avx512vnni"
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= flags:
        return "avx512vnni"
    return "avx2" if {"avx2", "fma"} <= flags else "portable"


def test_the_isa_is_reported():
    assert native_int8.isa() == best_isa()


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2"])
def test_an_isa_is_run_by_name_or_refused_by_name(rng, isa):
    """isa="avx512vnni" or "avx2" runs those primitives where the CPU has them (the
    same output as the portable ones, bit for bit) and is refused, naming what the CPU
    runs, where not."""
    x, kernel_q, kernel_scale, bias = _case(rng, 13, 1027, 40)
    kernel_q[::3] = -128
    order = ["avx512vnni", "avx2", "portable"]
    if order.index(isa) >= order.index(best_isa()):
        y = native_int8.dense_int8_native(x, kernel_q, kernel_scale, bias, epsilon=1e-7, isa=isa)
        portable = native_int8.dense_int8_native(x, kernel_q, kernel_scale, bias, epsilon=1e-7, isa="portable")
        np.testing.assert_array_equal(y.numpy(), portable.numpy())
    else:
        expected = f"isa='{isa}' needs a CPU that runs it; this one runs '{best_isa()}' at best"
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
            native_int8.dense_int8_native(x, kernel_q, kernel_scale, bias, epsilon=1e-7, isa=isa)


def test_layer_runs_native_bit_equal_to_keras(rng):
    ours = layers.Dense(48, activation="relu", bias_initializer="random_normal", implementation="native")
    theirs = keras.layers.Dense(48, activation="relu", bias_initializer="random_normal")
    ours.build((None, 100))
    theirs.build((None, 100))
    theirs.set_weights(ours.get_weights())
    ours.quantize("int8")
    theirs.quantize("int8")
    x = rng.standard_normal((2, 17, 100)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(theirs(x)))
    np.testing.assert_array_equal(np.asarray(tf.function(ours)(x)), np.asarray(theirs(x)))


def test_layer_honours_a_kernel_assigned_after_the_first_call(rng):
    ours = layers.Dense(20, implementation="native")
    theirs = keras.layers.Dense(20)
    for layer in (ours, theirs):
        layer.build((None, 30))
    theirs.set_weights(ours.get_weights())
    ours.quantize("int8")
    theirs.quantize("int8")
    x = rng.standard_normal((5, 30)).astype(np.float32)
    traced = tf.function(ours)
    ours(x), traced(x)
    new_kernel = rng.integers(-127, 128, (30, 20)).astype(np.int8)
    for layer in (ours, theirs):
        layer._kernel.assign(new_kernel)
    expected = np.asarray(theirs(x))
    np.testing.assert_array_equal(np.asarray(ours(x)), expected)
    np.testing.assert_array_equal(np.asarray(traced(x)), expected)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process state where the library was never built, with an empty cache."""
    monkeypatch.setenv("FASTLAYERS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build_lib, "_failure", None)
    monkeypatch.setattr(build_lib, "_warned", set())
    monkeypatch.setattr(build_lib, "_loaded", None)
    return tmp_path


def test_no_compiler_names_the_reason(monkeypatch, fresh_build, rng):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    x, kernel_q, kernel_scale, bias = _case(rng, 3, 4, 5)
    with pytest.raises(ValueError, match=r"implementation='native'.*could not be built: no C\+\+ compiler"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernels.dense_int8(x, kernel_q, kernel_scale, bias, implementation="native")
    with pytest.raises(build_lib.BuildError, match="no C\\+\\+ compiler"):
        native_int8.isa()


def test_auto_skips_a_failed_build_with_one_warning(monkeypatch, fresh_build, rng):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    x, kernel_q, kernel_scale, bias = _case(rng, 3, 4, 5)
    run = tf.function(lambda x: kernels.dense_int8(x, kernel_q, kernel_scale, bias))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = run(x)
        run(x * 2.0)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "fastlayers: the native int8 Dense kernel is unavailable: no C++ compiler: "
        f"CXX='{fresh_build / 'no-such-compiler'}' is not an executable on PATH"
    ]
    np.testing.assert_allclose(y.numpy(), int8_oracle(x, kernel_q, kernel_scale, bias), rtol=1e-6)


def test_a_failing_source_is_named(monkeypatch, fresh_build):
    monkeypatch.setenv("FASTLAYERS_NATIVE_CXXFLAGS", "-DFASTLAYERS_UNUSED=1")
    sound, broken = fresh_build / "sound.cc", fresh_build / "dense_int8.cc"
    sound.write_text("int fastlayers_sound() { return 0; }\n")
    broken.write_text("#error the int8 source is broken\n")
    monkeypatch.setattr(build_lib, "SOURCES", (sound, broken))
    with pytest.raises(build_lib.BuildError, match=r"(?s)compiling dense_int8.cc failed \(exit 1\): .*the int8 source is broken"):
        build_lib.build()


def test_a_float_layer_refuses_native_with_the_reason(rng):
    layer = layers.Dense(4, implementation="native")
    layer.build((None, 3))
    with pytest.raises(ValueError, match="kernel 'dense' has no native implementation"):
        layer(rng.standard_normal((2, 3)).astype(np.float32))


@pytest.mark.slow
def test_address_sanitizer_build_runs_the_cases(tmp_path):
    """Builds the library with -fsanitize=address and runs awkward sizes of the int8
    op, both ISAs, in a process with ASan preloaded: an out-of-bounds access aborts it."""
    preload = " ".join(
        subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        for name in ("libasan.so", "libstdc++.so")
    )
    script = textwrap.dedent(
        """
        import numpy as np
        from fastlayers.kernels.native import dense_int8
        rng = np.random.default_rng(0)
        for m, k, n in [(1, 1, 1), (7, 33, 17), (97, 301, 260), (5, 0, 3), (0, 4, 3), (13, 2, 0)]:
            x = rng.standard_normal((m, k)).astype(np.float32)
            kernel_q = rng.integers(-127, 128, (k, n)).astype(np.int8)
            scale = rng.uniform(1, 2, n).astype(np.float32)
            bias = rng.standard_normal(n).astype(np.float32)
            outs = [dense_int8.dense_int8_native(x, kernel_q, scale, bias, epsilon=1e-7, isa=isa).numpy()
                    for isa in ("best", "portable")]
            np.testing.assert_array_equal(*outs)
        print("ok")
        """
    )
    env = {
        **os.environ,
        "FASTLAYERS_CACHE_DIR": str(tmp_path),
        "FASTLAYERS_NATIVE_CXXFLAGS": "-fsanitize=address -fno-omit-frame-pointer",
        "LD_PRELOAD": preload,
        "ASAN_OPTIONS": "detect_leaks=0",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    report = result.stderr[result.stderr.find("ERROR: AddressSanitizer"):][:4000]
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), report or result.stderr[-4000:]
