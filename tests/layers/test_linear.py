"""layers.Linear: the tutorial's layer, with eager or deferred weight creation."""

import keras
import numpy as np
import pytest

from fastlayers import layers, testing


def test_the_tutorial_example():
    layer = layers.Linear(4, 2)  # units=4, input_dim=2: weights exist before any call
    assert layer.built and [w.shape for w in layer.weights] == [(2, 4), (4,)]
    y = layer(np.ones((2, 2), "float32"))
    assert y.shape == (2, 4)
    np.testing.assert_allclose(y, np.ones((2, 2)) @ layer.w.numpy(), rtol=1e-6)


def test_weights_are_created_on_first_call_without_input_dim():
    layer = layers.Linear(3)
    assert not layer.built and layer.weights == []
    layer(np.ones((5, 7), "float32"))
    assert [(w.name, w.shape) for w in layer.weights] == [("w", (7, 3)), ("b", (3,))]
    assert all(w.trainable for w in layer.weights)


def test_matches_numpy_under_every_policy_and_implementation(rng):
    def oracle(x, weights):
        w, b = weights
        return np.tensordot(x, w, axes=1) + b

    testing.assert_layer_matches(lambda **kw: layers.Linear(5, **kw), oracle,
                                 rng.standard_normal((3, 2, 4)))


def test_gradients_match_the_reference(rng):
    testing.assert_gradients_match_reference(lambda **kw: layers.Linear(5, **kw),
                                             rng.standard_normal((3, 4)))


def test_input_dim_disagreeing_with_the_input():
    layer = layers.Linear(4, input_dim=3)
    with pytest.raises(ValueError, match=r"expected axis -1 of input shape to have value 3"):
        layer(np.ones((2, 5), "float32"))


@pytest.mark.parametrize("argument, value", [("units", 0), ("units", 1.5), ("input_dim", -2), ("input_dim", "3")])
def test_bad_sizes_name_the_value(argument, value):
    with pytest.raises(ValueError, match=rf"`{argument}`, expected a positive integer. Received: {argument}={value!r}"):
        layers.Linear(**{argument: value})


def test_rank_one_input_is_refused():
    with pytest.raises(ValueError, match=r"expected min_ndim=2, found ndim=1"):
        layers.Linear(2)(np.ones(3, "float32"))


@pytest.mark.parametrize("input_dim", [4, None])
def test_config_output_shape_and_keras_file_round_trip(input_dim, tmp_path, rng):
    layer = layers.Linear(3, input_dim=input_dim, implementation="xla")
    config = layer.get_config()
    assert config["units"] == 3 and config["input_dim"] == input_dim
    assert layers.Linear.from_config(config).get_config() == config
    assert layer.compute_output_shape((None, 6, 4)) == (None, 6, 3)
    testing.assert_keras_round_trip(layer, rng.standard_normal((2, 4)), tmp_path)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_trains(jit_compile, rng):
    model = keras.Sequential([keras.Input((3,)), layers.Linear(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    x = rng.standard_normal((128, 3)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], "float32") + 0.3
    losses = model.fit(x, y, epochs=20, batch_size=32, verbose=0).history["loss"]
    assert losses[-1] < 1e-2 * losses[0], losses
