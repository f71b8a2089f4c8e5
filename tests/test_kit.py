"""The bring-your-own-layer kit: kernels.kernel, layers.CompiledLayer, fastlayers.testing."""

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


class MyDense(layers.CompiledLayer):
    """The tutorial's simplified Dense, written as a reference call only."""

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
    assert no_xla.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32) == "graph"
    np.testing.assert_array_equal(no_xla(tf.ones([2])), [2.0, 2.0])


def test_a_kernel_needs_a_floating_tensor():
    with pytest.raises(TypeError, match=r"Kernel 'scaled_softplus' needs at least one floating tensor"):
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
    assert keras.saving.get_registered_name(MyDense) == f"{__name__}>MyDense"
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
    chosen = layer._fastlayers_kernel.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32)
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
