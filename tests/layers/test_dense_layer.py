"""layers.Dense as a drop-in for keras.layers.Dense."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import IMPLEMENTATIONS, round_to

from fastlayers import layers, testing
from fastlayers.kernels.precision import tolerance


def _pair(units=6, input_dim=5, implementation=None, **kwargs):
    """A Keras Dense and ours with Keras's weights, both built on ``input_dim``."""
    theirs = keras.layers.Dense(units, **kwargs)
    ours = layers.Dense(units, implementation=implementation, **kwargs)
    theirs.build((None, input_dim))
    ours.build((None, input_dim))
    ours.set_weights(theirs.get_weights())
    return ours, theirs


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_numpy_under_every_policy(policy, implementation, rng):
    layer = layers.Dense(7, activation="relu", bias_initializer="random_normal",
                         implementation=implementation)
    x = rng.standard_normal((4, 3, 9)).astype("float32")
    y = layer(x)
    compute = policy.compute_dtype
    assert y.dtype == compute
    assert layer.kernel.dtype == policy.variable_dtype and layer.bias.dtype == policy.variable_dtype
    kernel, bias = (round_to(v.numpy(), compute) for v in (layer.kernel, layer.bias))
    expected = np.maximum(np.tensordot(round_to(x, compute), kernel, axes=1) + bias, 0)
    tolerance(compute).check(np.asarray(y, np.float64), expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 127), (127, 3), (2, 1023), (2, 3, 5, 4)])
def test_keras_weights_give_keras_outputs(policy, implementation, shape, rng):
    ours, theirs = _pair(3, shape[-1], implementation, activation="gelu")
    x = rng.standard_normal(shape).astype("float32")
    tolerance(policy.compute_dtype).check(
        np.asarray(ours(x), np.float64), np.asarray(theirs(x), np.float64)
    )


def test_weight_layout_and_order_are_kerass(rng):
    ours, theirs = _pair(4, 3)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights] == ["kernel", "bias"]
    assert [w.shape for w in ours.weights] == [(3, 4), (4,)]
    no_bias = layers.Dense(4, use_bias=False)
    no_bias.build((None, 3))
    assert no_bias.bias is None and [w.name for w in no_bias.weights] == ["kernel"]


def test_config_round_trips_and_matches_kerass_keys():
    arguments = dict(
        units=5, activation="tanh", use_bias=False, kernel_initializer="he_normal",
        kernel_regularizer="l2", bias_regularizer="l1", activity_regularizer="l2",
        kernel_constraint="non_neg", bias_constraint="max_norm", name="d",
    )
    ours = layers.Dense(**arguments, implementation="xla")
    config = ours.get_config()
    theirs = keras.layers.Dense(**arguments).get_config()
    assert {key: value for key, value in config.items() if key != "implementation"} == theirs
    clone = layers.Dense.from_config(config)
    assert clone.get_config() == config
    assert clone.implementation == "xla" and clone.activation is keras.activations.tanh


def test_compute_output_shape_and_symbolic_call():
    layer = layers.Dense(4)
    assert layer.compute_output_shape((None, 7, 3)) == (None, 7, 4)
    assert layer(keras.Input((7, 3))).shape == (None, 7, 4)


def test_masks_pass_through():
    inputs = keras.Input((4, 3))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    outputs = layers.Dense(2)(masked)
    assert outputs._keras_mask is not None
    x = np.ones((2, 4, 3), "float32")
    x[0, 2:] = 0.0
    mask = layers.Dense(2).compute_mask(x, keras.layers.Masking(0.0).compute_mask(x))
    np.testing.assert_array_equal(mask.numpy(), [[True, True, False, False], [True] * 4])


def test_regularizer_losses_match_kerass(rng):
    ours, theirs = _pair(3, 4, kernel_regularizer="l2", bias_regularizer="l1",
                         bias_initializer="ones", activity_regularizer="l2")
    x = rng.standard_normal((2, 4)).astype("float32")
    ours(x), theirs(x)
    assert len(ours.losses) == len(theirs.losses) == 3
    np.testing.assert_allclose(sorted(float(l) for l in ours.losses),
                               sorted(float(l) for l in theirs.losses), rtol=1e-6)


# Training under jit_compile=True compiles the whole step with our kernel inside:
# auto's by default, each explicit implementation's with -m slow.
@pytest.mark.parametrize("implementation, jit_compile", [
    *((implementation, False) for implementation in IMPLEMENTATIONS),
    (None, True),
    *(pytest.param(implementation, True, marks=pytest.mark.slow)
      for implementation in IMPLEMENTATIONS if implementation is not None),
])
def test_trains_in_a_functional_model(implementation, jit_compile, rng):
    inputs = keras.Input((6,))
    hidden = layers.Dense(16, activation="relu", kernel_constraint="non_neg",
                          implementation=implementation)(inputs)
    outputs = layers.Dense(1, implementation=implementation)(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", jit_compile=jit_compile)
    x = rng.standard_normal((256, 6)).astype("float32")
    y = x @ rng.standard_normal((6, 1)).astype("float32")
    history = model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.all(model.layers[1].kernel.numpy() >= 0)  # the constraint was applied


def test_layer_gradients_match_the_reference(rng):
    testing.assert_gradients_match_reference(
        lambda **kw: layers.Dense(4, activation="sigmoid", bias_initializer="random_normal", **kw),
        rng.standard_normal((5, 8)),
    )


def test_saves_and_loads_a_keras_file_in_safe_mode(tmp_path, rng):
    layer = layers.Dense(4, activation="relu", implementation="graph", kernel_regularizer="l2")
    loaded = testing.assert_keras_round_trip(layer, rng.standard_normal((2, 3)), tmp_path)
    assert loaded.layers[-1].implementation == "graph"


@pytest.mark.parametrize(
    "units", [0, -3, 2.5, "8", True, None],
)
def test_bad_units_name_the_value(units):
    with pytest.raises(ValueError, match=rf"`units`, expected a positive integer. Received: units={units!r}"):
        layers.Dense(units)


def test_numpy_integer_units_are_accepted():
    assert layers.Dense(np.int64(3)).units == 3


def test_rank_one_input_is_refused_like_keras():
    with pytest.raises(ValueError, match=r"expected min_ndim=2, found ndim=1. Full shape received: \(3,\)"):
        layers.Dense(2)(np.ones(3, "float32"))


def test_input_whose_last_axis_disagrees_with_the_kernel():
    layer = layers.Dense(2)
    layer(np.ones((1, 4), "float32"))
    with pytest.raises(ValueError, match=r"expected axis -1 of input shape to have value 4.*\(1, 5\)"):
        layer(np.ones((1, 5), "float32"))


def test_unknown_implementation_and_activation():
    with pytest.raises(ValueError, match=r"Received: implementation='fastest'"):
        layers.Dense(2, implementation="fastest")
    with pytest.raises(ValueError, match=r"`activation`.*Received: activation='relux'"):
        layers.Dense(2, activation="relux")


def test_is_a_keras_dense():
    assert issubclass(layers.Dense, keras.layers.Dense)


def _lora_pair(rng, implementation, **kwargs):
    ours, theirs = _pair(6, 5, implementation, activation="relu", bias_initializer="ones", **kwargs)
    for layer in (ours, theirs):
        layer.enable_lora(3, lora_alpha=6)
    b = rng.standard_normal((3, 6)).astype("float32")
    theirs.lora_kernel_b.assign(b)
    ours.set_weights(theirs.get_weights())
    return ours, theirs


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_lora_matches_kerass_outputs_and_gradients(implementation, rng):
    ours, theirs = _lora_pair(rng, implementation)
    assert [w.name for w in ours.trainable_weights] == [w.name for w in theirs.trainable_weights]
    assert "kernel" not in [w.name for w in ours.trainable_weights]
    x = tf.constant(rng.standard_normal((4, 5)), tf.float32)

    def outputs_and_grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        return [layer(x)] + tape.gradient(loss, [x] + layer.trainable_weights)

    for actual, expected in zip(outputs_and_grads(ours), outputs_and_grads(theirs)):
        tolerance("float32", grad=True).check(actual, expected)


def test_lora_runs_through_the_fused_kernel(rng):
    ours, _ = _lora_pair(rng, "graph")
    profile = tf.function(ours).get_concrete_function(tf.TensorSpec((4, 5), tf.float32))
    ops = {op.type for op in profile.graph.get_operations()}
    # The low-rank update is a second product: the merged [K, N] kernel is never formed.
    matmuls = [op for op in profile.graph.get_operations() if op.type in ("MatMul", "BatchMatMulV2")]
    assert any("fastlayers/dense/graph" in op.name for op in matmuls), ops
    assert not any(op.outputs[0].shape == (5, 6) for op in matmuls)


def test_lora_from_the_constructor_and_config(rng):
    layer = layers.Dense(4, lora_rank=2, lora_alpha=8, implementation="xla")
    theirs = keras.layers.Dense(4, lora_rank=2, lora_alpha=8)
    for built in (layer, theirs):
        built.build((None, 3))
    assert layer.lora_enabled and layer.lora_rank == 2
    config = layer.get_config()
    # Keras 3.15's build enables LoRA with lora_alpha = lora_rank: the same here.
    assert config == {**theirs.get_config(), "name": layer.name, "implementation": "xla"}


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_lora_trains_only_the_low_rank_factors(implementation, rng):
    inputs = keras.Input((8,))
    outputs = layers.Dense(4, implementation=implementation)(inputs)
    model = keras.Model(inputs, outputs)
    model.layers[-1].enable_lora(2)
    frozen = model.layers[-1]._kernel.numpy()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    x = rng.standard_normal((64, 8)).astype("float32")
    y = x @ rng.standard_normal((8, 4)).astype("float32")
    history = model.fit(x, y, epochs=6, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < history[0]
    np.testing.assert_array_equal(model.layers[-1]._kernel.numpy(), frozen)


def test_sparse_inputs_run_kerass_computation(rng):
    ours, theirs = _pair(3, 4)
    dense_x = np.array([[0, 1.5, 0, 0], [2, 0, 0, -1]], "float32")
    sparse = tf.sparse.from_dense(dense_x)
    assert ours.not_supported_reasons(sparse) == ["sparse inputs: the fused kernel takes dense tensors"]
    tolerance("float32").check(ours(sparse), theirs(dense_x))


def test_an_explicit_implementation_refuses_sparse_inputs_naming_the_reason():
    layer = layers.Dense(3, implementation="xla")
    sparse = tf.sparse.from_dense(np.eye(4, dtype="float32"))
    with pytest.raises(ValueError, match=r"implementation='xla' cannot run Dense on this call: sparse inputs"):
        layer(sparse)


def test_integer_inputs_run_kerass_computation():
    ours, theirs = _pair(3, 4)
    x = np.arange(8, dtype="int32").reshape(2, 4)
    assert ours.not_supported_reasons(tf.constant(x)) == [
        "inputs of dtype int32: the fused kernel takes floating inputs"
    ]
    tolerance("float32").check(ours(x), theirs(x))


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_like_keras(mode, rng):
    ours, theirs = _pair(8, 16, activation="relu")
    ours.quantize(mode)
    theirs.quantize(mode)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    for mine, keras_weight in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_array_equal(mine, keras_weight)
    x = rng.standard_normal((5, 16)).astype("float32")
    tolerance("float32").check(ours(x), theirs(x))


def test_subclasses_of_ours_are_not_quantized_silently():
    class Custom(layers.Dense):
        pass

    layer = Custom(3)
    layer.build((None, 4))
    with pytest.raises(NotImplementedError, match="does not have a `quantize` method implemented"):
        layer.quantize("int8")


def _int8_pair(rng, implementation=None, units=24, input_dim=40):
    ours, theirs = _pair(units, input_dim, implementation, activation="relu", bias_initializer="random_normal")
    float_layer = keras.layers.Dense(units, activation="relu")
    float_layer.build((None, input_dim))
    float_layer.set_weights(theirs.get_weights())
    ours.quantize("int8")
    theirs.quantize("int8")
    return ours, theirs, float_layer


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_int8_runs_the_fused_kernel_with_kerass_semantics(implementation, rng):
    ours, theirs, float_layer = _int8_pair(rng, implementation)
    x = rng.standard_normal((3, 7, 40)).astype("float32")
    x[0, 0] = 0.0  # a row of zeros: the epsilon keeps its scale finite
    assert ours.int8_not_supported_reasons(tf.constant(x)) == []
    actual, expected = np.asarray(ours(x)), np.asarray(theirs(x))
    tolerance("float32").check(actual, expected)
    # Quantized, not float: the error against float32 is Keras's int8 error.
    float_out = np.asarray(float_layer(x))
    assert 0 < np.abs(actual - float_out).max() <= 1.5 * np.abs(expected - float_out).max()


def test_int8_fused_kernel_is_the_one_that_runs(rng):
    ours, _, _ = _int8_pair(rng, "graph")
    graph = tf.function(ours).get_concrete_function(tf.TensorSpec((5, 40), tf.float32)).graph
    products = [op for op in graph.get_operations() if op.type in ("MatMul", "BatchMatMulV3")]
    assert products and all("fastlayers/dense_int8/graph" in op.name for op in products)
    assert all(op.inputs[0].dtype == tf.int8 for op in products)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_int8_input_gradient_is_kerass_straight_through_one(implementation, rng):
    ours, theirs, _ = _int8_pair(rng, implementation)
    x = tf.constant(rng.standard_normal((6, 40)), tf.float32)

    def input_gradient(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, x)

    tolerance("float32", grad=True).check(input_gradient(ours), input_gradient(theirs))


def test_int8_in_a_model_quantized_after_building(rng, tmp_path):
    inputs = keras.Input((40,))
    outputs = layers.Dense(8)(layers.Dense(24, activation="relu")(inputs))
    model = keras.Model(inputs, outputs)
    x = rng.standard_normal((16, 40)).astype("float32")
    before = np.asarray(model(x))
    model.quantize("int8")
    assert [layer.quantization_mode for layer in model.layers[1:]] == ["int8", "int8"]
    after = np.asarray(model(x))
    assert 0 < np.abs(after - before).max() < 0.1 * np.abs(before).max()
    path = tmp_path / "int8.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(np.asarray(restored(x)), after)


def test_int8_with_a_custom_inputs_quantizer_runs_kerass_computation(rng):
    ours, theirs = _pair(6, 8)
    config = keras.quantizers.Int8QuantizationConfig(
        activation_quantizer=keras.quantizers.AbsMaxQuantizer(value_range=(-64, 64))
    )
    ours.quantize("int8", config=config)
    theirs.quantize("int8", config=config)
    x = rng.standard_normal((3, 8)).astype("float32")
    (reason,) = ours.int8_not_supported_reasons(tf.constant(x))
    assert "the int8 kernel quantizes each input row to [-127, 127]" in reason
    tolerance("float32").check(ours(x), theirs(x))
    explicit = layers.Dense(6, implementation="xla")
    explicit.build((None, 8))
    explicit.quantize("int8", config=config)
    with pytest.raises(ValueError, match=r"implementation='xla' cannot run the int8 Dense on this call: inputs quantizer"):
        explicit(x)
