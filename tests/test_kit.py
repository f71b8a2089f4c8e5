"""The bring-your-own-layer kit: kernels.kernel, layers.CompiledLayer, fastlayers.testing."""

import re
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from fastlayers import kernels, layers, testing
from fastlayers.kernels import dispatch


@kernels.kernel(upcast=True)
def scaled_softplus(x, scale=1.0):
    return scale * tf.math.softplus(x)


def softplus_oracle(x, scale=1.0):
    return scale * np.logaddexp(0.0, x)


class MyDense(layers.CompiledLayer, package="fastlayers_tests"):
    """The tutorial's simplified Dense, written as a reference call only.

    Registered under its own package: the README's and the CLI tests' MyDense take
    Keras's default one.
    """

    def __init__(self, units, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units),
                                      initializer="glorot_normal")
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="random_normal")

    def call(self, x):
        return self.activation(x @ self.kernel + self.bias)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)


def my_dense_oracle(x, weights):
    kernel, bias = weights
    return np.tanh(x @ kernel + bias)


def test_a_declared_kernel_matches_its_oracle_everywhere(rng):
    testing.assert_kernel_matches(
        scaled_softplus, softplus_oracle, rng.standard_normal((3, 127)), scale=2.0
    )


def test_upcast_runs_low_precision_calls_in_float32():
    seen = []

    @kernels.kernel(upcast=True)
    def record(x):
        seen.append(x.dtype)
        return x * 2

    y = record(tf.ones([2], tf.bfloat16), implementation="reference")
    assert seen == [tf.float32] and y.dtype == tf.bfloat16
    record(tf.ones([2], tf.float32), implementation="reference")
    assert seen[-1] == tf.float32


def test_a_hand_written_compiled_variant_runs_for_graph_and_xla():
    traced = []

    def two_pass(x):
        traced.append("compiled")
        return tf.exp(x - tf.reduce_max(x)) * tf.exp(tf.reduce_max(x))

    @kernels.kernel(compiled=two_pass)
    def exp(x):
        return tf.exp(x)

    x = tf.constant([0.5, 1.0, 2.0])
    for implementation in ("graph", "xla"):
        np.testing.assert_allclose(exp(x, implementation=implementation), np.exp(x), rtol=1e-6)
    assert traced == ["compiled", "compiled"]
    assert exp.__name__ == "exp" and exp.name == "exp"


def test_declared_reasons_refuse_explicit_requests_and_steer_auto():
    def reasons(implementation, *, platform, dtype):
        return ["this kernel uses an op XLA lacks"] if implementation == "xla" else []

    @kernels.kernel(name="no_xla", not_supported_reasons=reasons,
                    auto={(dispatch.cpu_platform(), "*"): ("xla", "graph")})
    def no_xla(x):
        return x + 1

    with pytest.raises(ValueError, match="implementation='xla' cannot run kernel 'no_xla'.*an op XLA lacks"):
        no_xla(tf.ones([2]), implementation="xla")
    assert no_xla.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32).implementation == "graph"
    np.testing.assert_array_equal(no_xla(tf.ones([2])), [2.0, 2.0])


def test_a_kernel_needs_a_floating_tensor():
    with pytest.raises(TypeError, match=r"Kernel 'scaled_softplus' needs at least one floating "
                                        r"tensor argument. Received arguments of types: int"):
        scaled_softplus(3)
    with pytest.raises(ValueError, match=r"Received: implementation='jit'"):
        scaled_softplus(tf.ones([1]), implementation="jit")


def test_compiled_layer_matches_its_oracle_under_every_policy(rng):
    testing.assert_layer_matches(
        lambda **kw: MyDense(5, activation="tanh", **kw), my_dense_oracle,
        rng.standard_normal((4, 3, 8)),
    )


def test_compiled_layer_gradients_match_the_reference(rng):
    testing.assert_gradients_match_reference(
        lambda **kw: MyDense(5, activation="tanh", **kw), rng.standard_normal((4, 8)),
        policies=("float32", "mixed_bfloat16"),
    )


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_compiled_layer_config_registration_and_keras_file(implementation, rng, tmp_path):
    layer = MyDense(3, activation="tanh", implementation=implementation, name="mine")
    config = layer.get_config()
    assert {"units": 3, "activation": "tanh", "implementation": implementation}.items() <= config.items()
    assert MyDense.from_config(config).get_config() == config
    assert keras.saving.get_registered_name(MyDense) == "fastlayers_tests>MyDense"
    loaded = testing.assert_keras_round_trip(layer, rng.standard_normal((2, 6)), tmp_path)
    assert loaded.layers[-1].implementation == implementation


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_layer_trains(jit_compile, rng):
    model = keras.Sequential([keras.Input((6,)), MyDense(8, "relu"), MyDense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", jit_compile=jit_compile)
    x = rng.standard_normal((256, 6)).astype("float32")
    y = x @ rng.standard_normal((6, 1)).astype("float32")
    losses = model.fit(x, y, epochs=8, batch_size=64, verbose=0).history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_compiled_layer_runs_under_its_profiler_scope():
    layer = MyDense(2, implementation="graph")

    @tf.function
    def step(x):
        return layer(x)

    graph = step.get_concrete_function(tf.TensorSpec([1, 3])).graph
    assert any("fastlayers/my_dense/graph/" in op.name for op in graph.get_operations())


def test_compiled_layer_reasons_and_auto_row():
    class NoXLA(MyDense):
        auto = {(dispatch.cpu_platform(), "*"): ("xla", "graph")}

        def not_supported_reasons(self, implementation, *, platform, dtype, **options):
            return ["refused for this test"] if implementation == "xla" else []

    x = np.ones((1, 3), "float32")
    layer = NoXLA(2)
    assert layer(x).shape == (1, 2)
    (kernel,) = layer._fastlayers_kernels.values()
    chosen = kernel.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32).implementation
    assert chosen == "graph"
    with pytest.raises(ValueError, match="implementation='xla' cannot run kernel 'no_xla'.*refused for this test"):
        NoXLA(2, implementation="xla")(x)


def test_compiled_layer_with_object_arguments_asks_for_its_own_get_config():
    class Scaled(layers.CompiledLayer):
        def __init__(self, initializer, **kwargs):
            super().__init__(**kwargs)
            self.initializer = initializer

        def call(self, x):
            return x

    with pytest.raises(NotImplementedError, match="override get_config"):
        Scaled(keras.initializers.Ones()).get_config()


def test_testing_checks_fail_on_a_wrong_oracle(rng):
    with pytest.raises(AssertionError, match="max error"):
        testing.assert_kernel_matches(
            scaled_softplus, lambda x, scale=1.0: softplus_oracle(x, scale) + 0.1,
            rng.standard_normal((2, 3)), dtypes=("float32",), implementations=("graph",),
        )
    with pytest.raises(AssertionError, match="max error"):
        testing.assert_layer_matches(
            lambda **kw: MyDense(2, "tanh", **kw),
            lambda x, w: my_dense_oracle(x, w) * 1.1,
            rng.standard_normal((2, 3)), policies=("float32",), implementations=("xla",),
        )


def test_a_bare_kernel_decorator_declares_one_with_the_defaults():
    @kernels.kernel
    def double(x):
        return 2 * x

    assert isinstance(double, dispatch.Kernel) and double.name == "double"
    for implementation in testing.IMPLEMENTATIONS:
        np.testing.assert_array_equal(double(tf.ones([2]), implementation=implementation), [2, 2])


@pytest.mark.parametrize(
    "auto, message",
    [
        ({("cpu-onednn-bf16", "*"): ("jit",)},
         "entries must be a non-empty tuple of 'reference', 'graph', 'xla', 'native'. "
         "Received: ('cpu-onednn-bf16', '*'): ('jit',)"),
        ({("CPU", "*"): ("xla",)},
         "platform 'CPU' is not one of 'cpu', 'cpu-onednn', 'cpu-onednn-bf16', 'gpu'. "
         "Received: ('CPU', '*'): ('xla',)"),
        ({("cpu", "int32"): ("xla",)}, "dtype 'int32' is not the name of a floating dtype"),
        ({("cpu", "half"): ("xla",)}, "dtype 'half' is not the name of a floating dtype"),
        ({("cpu", "*"): 5}, "entries must be a non-empty tuple"),
        ({("cpu", "*"): "xla"}, "entries must be a non-empty tuple"),
        ({("cpu", "*"): ()}, "entries must be a non-empty tuple"),
        ({"cpu": ("xla",)}, "a key is not a (platform, dtype name) or (platform, dtype name, row) tuple of strings. Received: 'cpu'"),
        ("xla", "expected a dict mapping (platform, dtype name) to a tuple"),
    ],
)
def test_a_bad_auto_row_is_refused_when_declared(auto, message):
    with pytest.raises(ValueError, match=r"invalid auto row for kernel 'identity'.*" + re.escape(message)):
        kernels.kernel(name="identity", auto=auto)(lambda x: x)
    row = auto
    with pytest.raises(ValueError, match=r"invalid auto row for kernel 'Identity'.*" + re.escape(message)):
        class Identity(layers.CompiledLayer, package="fastlayers_tests"):  # noqa: F841
            auto = row

            def call(self, x):
                return x


def test_auto_says_why_when_nothing_in_its_row_can_run():
    platform = dispatch.cpu_platform()

    @kernels.kernel(
        auto={(platform, "*"): ("xla", "graph")},
        not_supported_reasons=lambda implementation, **_: [f"no {implementation} today"],
    )
    def picky(x):
        return x

    with pytest.raises(ValueError, match=re.escape(
            f"No implementation of kernel 'picky' supports dtype float32 on {platform}. "
            "Refused: 'xla': no xla today | 'graph': no graph today")):
        picky(tf.ones([2]))


class Doubled(MyDense, package="fastlayers_tests"):
    """A subclass whose reference calls its parent's."""

    def call(self, x):
        return 2.0 * super().call(x)


def test_a_subclass_calling_super_call_compiles_once(rng):
    x = rng.standard_normal((4, 8)).astype("float32")
    layer = Doubled(3, "tanh", implementation="xla")
    outputs = [layer(x) for _ in range(3)]
    (kernel,) = layer._fastlayers_kernels.values()
    assert kernel.name == "doubled"
    assert kernel._functions["xla"].experimental_get_tracing_count() == 1
    weights = [w.numpy() for w in layer.weights]
    for y in outputs:
        np.testing.assert_allclose(y, 2 * my_dense_oracle(x, weights), rtol=1e-5, atol=1e-6)
    testing.assert_layer_matches(
        lambda **kw: Doubled(3, "tanh", **kw), lambda x, w: 2 * my_dense_oracle(x, w), x,
        policies=("float32", "mixed_bfloat16"),
    )


def test_compiled_layer_registers_under_the_keras_default_package():
    class KitDefaultPackage(layers.CompiledLayer):
        def call(self, x):
            return x

    assert keras.saving.get_registered_name(KitDefaultPackage) == "Custom>KitDefaultPackage"


NOTEBOOK = """
import sys

import keras
import numpy as np
from fastlayers import layers

class NotebookDense(layers.CompiledLayer):
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units))

    def call(self, x):
        return x @ self.kernel

keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((3,)), NotebookDense(2, implementation="xla")])
np.save(sys.argv[2], model(np.ones((1, 3), "float32")))
model.save(sys.argv[1])
"""


def test_a_file_saved_from_a_script_loads_once_the_class_lives_in_a_module(tmp_path, monkeypatch):
    """The class written in a notebook or script (module __main__), then moved into a module."""
    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK)
    path, expected = tmp_path / "model.keras", tmp_path / "expected.npy"
    done = subprocess.run([sys.executable, str(script), str(path), str(expected)],
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module = tmp_path / "fl_moved_layers.py"
    module.write_text(NOTEBOOK.split("keras.utils.set_random_seed")[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    import fl_moved_layers  # noqa: F401  (registers the class, as a user's import would)

    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.layers[0]).__module__ == "fl_moved_layers"
    assert loaded.layers[0].implementation == "xla"
    np.testing.assert_array_equal(loaded(np.ones((1, 3), "float32")), np.load(expected))


class Lookup(layers.CompiledLayer, package="fastlayers_tests"):
    """An embedding: integer inputs, floating table."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(10, 3))

    def call(self, ids):
        return tf.gather(self.table, ids)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_a_compiled_layer_with_integer_inputs_dispatches_on_its_compute_dtype(policy):
    ids = np.array([[1, 2], [9, 0]], "int32")
    with testing.dtype_policy(policy):
        reference = Lookup(implementation="reference")
        expected = reference(ids)
        assert expected.dtype == reference.compute_dtype
        for implementation in (None, "graph", "xla"):
            layer = Lookup(implementation=implementation)
            layer.build(ids.shape)
            layer.table.assign(reference.table)
            y = layer(ids)
            assert y.dtype == layer.compute_dtype
            np.testing.assert_array_equal(y, expected)


class Recorded(layers.CompiledLayer, package="fastlayers_tests"):
    """Records the dtypes its reference sees."""

    upcast = True

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 2))
        self.seen = []

    def call(self, x):
        self.seen.append((x.dtype.name, self.kernel.value.dtype.name))
        return x @ self.kernel


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16", "float16", "float32"])
@pytest.mark.parametrize("implementation", ["reference", "graph", "xla"])
def test_upcast_layers_compute_in_float32_and_answer_in_the_compute_dtype(policy, implementation, rng):
    x = rng.standard_normal((4, 8))
    with testing.dtype_policy(policy):
        layer = Recorded(implementation=implementation)
        y = layer(x.astype("float32"))
    assert layer.seen == [("float32", "float32")]
    assert y.dtype == layer.compute_dtype
    # float32 products of the rounded operands, rounded once to the compute dtype.
    kernel = testing.round_to(layer.kernel.numpy(), layer.variable_dtype)
    expected = testing.round_to(testing.round_to(x, layer.compute_dtype) @ kernel, layer.compute_dtype)
    np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float64)), expected, rtol=1e-6, atol=1e-6)


def test_kernel_checks_catch_a_wrong_dtype_and_a_wrong_gradient(rng):
    @kernels.kernel(compiled=lambda x: tf.cast(tf.exp(tf.cast(x, tf.float32)), tf.float32))
    def widening(x):
        return tf.exp(x)

    with pytest.raises(AssertionError, match="bfloat16 implementation='graph': output \\[0\\] is float32"):
        testing.assert_kernel_matches(widening, np.exp, rng.standard_normal((2, 3)),
                                      dtypes=("bfloat16",), implementations=("graph",))

    @tf.custom_gradient
    def wrong_square(x):
        return x * x, lambda dy: dy * x  # d(x²)/dx is 2x

    @kernels.kernel(compiled=wrong_square)
    def square(x):
        return x * x

    x = rng.standard_normal((2, 3)) + 3.0
    testing.assert_kernel_gradients_match_reference(square, x, implementations=("reference",))
    with pytest.raises(AssertionError, match=r"gradients float32 implementation='graph' input \[0\]: max error"):
        testing.assert_kernel_gradients_match_reference(square, x, dtypes=("float32",))


def test_kernel_gradients_of_a_hand_written_variant_match(rng):
    def stable_softplus(x, scale=1.0):
        return scale * (tf.nn.relu(x) + tf.math.log1p(tf.exp(-tf.abs(x))))

    @kernels.kernel(compiled=stable_softplus, upcast=True)
    def softplus(x, scale=1.0):
        return scale * tf.math.softplus(x)

    testing.assert_kernel_gradients_match_reference(softplus, rng.standard_normal((3, 65)), scale=2.0)


class LosesBiasGradient(MyDense, package="fastlayers_tests"):
    def call(self, x):
        bias = tf.stop_gradient(self.bias) if self.implementation == "xla" else self.bias
        return self.activation(x @ self.kernel + bias)


def test_layer_gradient_check_names_a_missing_gradient(rng):
    with pytest.raises(AssertionError, match=r"gradients policy=float32 implementation='xla' "
                                             r"loses_bias_gradient(_\d+)?/bias: no gradient here, "
                                             r"the other has one"):
        testing.assert_gradients_match_reference(
            lambda **kw: LosesBiasGradient(2, **kw), rng.standard_normal((2, 3)),
            policies=("float32",), implementations=("xla",))


class ForgetsScale(layers.CompiledLayer, package="fastlayers_tests"):
    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        return self.scale * x

    def get_config(self):  # drops `scale`
        return layers.FastLayer.get_config(self)


def test_keras_round_trip_check_fails_when_a_layer_forgets_an_argument(rng, tmp_path):
    with pytest.raises(AssertionError, match="output \\[0\\] of the loaded model differs"):
        testing.assert_keras_round_trip(ForgetsScale(2.0), rng.standard_normal((2, 3)), tmp_path)


class Bfloat16Weight(layers.CompiledLayer, package="fastlayers_tests"):
    """Keeps its weight in bfloat16 whatever the policy: not what a mixed policy asks."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones", dtype="bfloat16")

    def call(self, x):
        return x * keras.ops.cast(self.scale, x.dtype)


def test_layer_check_fails_on_a_weight_outside_the_variable_dtype():
    with pytest.raises(AssertionError, match="mixed_bfloat16: weight .*scale is bfloat16, "
                                             "the variable dtype is float32"):
        testing.assert_layer_matches(lambda **kw: Bfloat16Weight(**kw), lambda x, w: x,
                                     np.ones((2, 3)), policies=("mixed_bfloat16",))


def test_a_gradient_check_with_nothing_to_compare_fails():
    @kernels.kernel
    def constant(x):
        return tf.stop_gradient(x) * 2

    with pytest.raises(AssertionError, match=r"the reference has no gradient for any of input \[0\]"):
        testing.assert_kernel_gradients_match_reference(constant, np.ones((2, 2)), dtypes=("float32",))


def test_call_arguments_the_dispatcher_passes_are_refused_when_declared():
    with pytest.raises(TypeError, match=r"Cast.call cannot take arguments named 'implementation', "
                                        r"'platform', 'dtype', 'work'.*Received arguments named: dtype"):
        class Cast(layers.CompiledLayer, package="fastlayers_tests"):  # noqa: F841
            def call(self, x, dtype="float32"):
                return tf.cast(x, dtype)

    with pytest.raises(TypeError, match=r"Kernel 'placed'.*Received arguments named: platform"):
        @kernels.kernel
        def placed(x, platform=None):
            return x


class UpcastPair(layers.CompiledLayer, package="fastlayers_tests"):
    """Adds a keyword tensor; records what its reference sees."""

    upcast = True

    def __init__(self, barrier=None, **kwargs):
        super().__init__(**kwargs)
        self.barrier, self.seen = barrier, []

    def call(self, x, y=None):
        self.seen.append((x.dtype.name, y.dtype.name))
        if self.barrier is not None:
            self.barrier.wait(timeout=30)  # both threads inside the reference at once
        return x + y

    def get_config(self):
        return layers.FastLayer.get_config(self)


@pytest.mark.parametrize("implementation", ["reference", "graph", "xla"])
def test_upcast_casts_keyword_tensors_too(implementation):
    with testing.dtype_policy("mixed_float16"):
        layer = UpcastPair(implementation=implementation)
        z = layer(np.ones((2, 3), "float32"), y=np.full((2, 3), 2.0, "float32"))
    assert layer.seen == [("float32", "float32")] and z.dtype == tf.float16
    np.testing.assert_array_equal(z, np.full((2, 3), 3.0))


def test_threads_calling_one_layer_each_dispatch():
    """One thread inside a layer's reference does not make another's call part of it."""
    with testing.dtype_policy("mixed_float16"):
        layer = UpcastPair(implementation="reference")
        x = np.ones((2, 3), "float32")
        layer(x, y=x)  # build
        layer.barrier = threading.Barrier(2)
        layer.seen.clear()
        results = []
        threads = [threading.Thread(target=lambda: results.append(layer(x, y=x))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert layer.seen == [("float32", "float32")] * 2
    assert [r.dtype for r in results] == [tf.float16] * 2


def test_the_checks_print_no_retracing_warning_but_other_warnings_show(rng, caplog, monkeypatch):
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    # TensorFlow warns at most twice per traced Python function and process: a fresh
    # detector makes the warning below independent of the tests run before this one.
    monkeypatch.setattr(polymorphic_function, "_frequent_tracing_detector_manager",
                        polymorphic_function._FrequentTracingDetectorManager())
    make = lambda **kwargs: MyDense(3, activation="tanh", **kwargs)  # noqa: E731
    x = rng.standard_normal((4, 5))
    # Unwrapped, the check builds a layer per policy and implementation, and TensorFlow
    # warns about the retracing as if it were a mistake.
    with caplog.at_level("WARNING", logger="tensorflow"):
        testing.assert_layer_matches.__wrapped__(make, my_dense_oracle, x)
    assert "triggered tf.function retracing" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tensorflow"):
        testing.assert_layer_matches(make, my_dense_oracle, x)
        testing.assert_gradients_match_reference(make, x)
        testing.assert_kernel_matches(scaled_softplus, softplus_oracle, x)
        testing.assert_kernel_gradients_match_reference(scaled_softplus, x)
        with testing.expected_retracing():
            tf.get_logger().warning("another warning")
    assert "retracing" not in caplog.text
    assert "another warning" in caplog.text


@pytest.mark.parametrize("where", [".", "tmp_path", None])
def test_keras_round_trip_leaves_no_file_behind(rng, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where None puts it
    directory = {"tmp_path": tmp_path}.get(where, where)
    loaded = testing.assert_keras_round_trip(MyDense(3), rng.standard_normal((2, 4)), directory)
    assert isinstance(loaded, keras.Model)
    assert list(tmp_path.iterdir()) == []
