"""layers.Dense as a drop-in for keras.layers.Dense."""

import keras
import numpy as np
import pytest
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
    theirs.pop("quantization_config")
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


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
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


@pytest.mark.parametrize("argument", ["lora_rank", "quantization_config"])
def test_lora_and_quantization_are_refused_with_a_pointer(argument):
    with pytest.raises(ValueError, match=rf"use keras.layers.Dense for `{argument}`. Received: {argument}=4"):
        layers.Dense(2, **{argument: 4})
