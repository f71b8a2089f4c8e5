"""CenterZero: the tutorial's centred window, zeroed; the odd leftover placement."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import COMPILED, IMPLEMENTATIONS, round_to
from oracles import center_zero_oracle

from fastlayers import kernels, layers
from fastlayers.kernels import masking


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tutorial_sixes(implementation):
    y = layers.CenterZero(size=(2, 2), implementation=implementation)(np.full((1, 10, 10), 6.0))
    expected = np.full((10, 10), 6.0)
    expected[4:6, 4:6] = 0.0  # rows and columns 4 and 5, as in the tutorial
    np.testing.assert_array_equal(y[0], expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tutorial_literal_call_on_one_array(implementation):
    # The tutorial calls the layer on a bare (10, 10) array, no batch axis: a rank-2
    # input is one 2-D array, windowed over both of its axes.
    y = layers.CenterZero(implementation=implementation)(np.full((10, 10), 6.0))
    expected = np.full((10, 10), 6.0)
    expected[4:6, 4:6] = 0.0
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_numpy_under_every_policy(implementation, policy, rng):
    x = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)
    y = layers.CenterZero((3, 2), implementation=implementation)(x)
    assert y.dtype == policy.compute_dtype
    expected = center_zero_oracle(round_to(x, policy.compute_dtype), (3, 2))
    np.testing.assert_array_equal(np.asarray(y, np.float64), expected)  # selects, never rounds


def test_odd_leftover_goes_below_and_right():
    # (7 - 2) and (6 - 3) are odd: the window starts at row 2 and column 1, leaving
    # two rows below it and two columns right of it, one above and one left.
    y = layers.CenterZero((2, 3))(np.ones((1, 7, 6), np.float32))[0].numpy()
    zero_rows, zero_cols = np.nonzero(y == 0)
    assert sorted(set(zero_rows)) == [2, 3] and sorted(set(zero_cols)) == [1, 2, 3]
    assert masking.center_window(7, 6, (2, 3)) == (2, 1)


def test_zeroes_inf_and_nan_inside_the_window():
    x = np.ones((1, 4, 4), np.float32)
    x[0, 1, 1], x[0, 2, 2], x[0, 0, 0] = np.inf, np.nan, np.inf
    for implementation in IMPLEMENTATIONS:
        y = layers.CenterZero(2, implementation=implementation)(x)[0].numpy()
        assert y[1, 1] == 0 and y[2, 2] == 0 and y[0, 0] == np.inf


@pytest.mark.parametrize("implementation", COMPILED)
def test_compiled_gradients_match_reference(implementation, policy, rng):
    x = tf.constant(rng.standard_normal((2, 5, 6)).astype(np.float32))

    def grad(impl):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layers.CenterZero((3, 2), implementation=impl)(x)
        return tape.gradient(y, x, output_gradients=tf.ones_like(y))

    expected = grad("reference")
    np.testing.assert_array_equal(expected[0], masking.center_zero_mask(5, 6, (3, 2)))
    kernels.tolerance(policy.compute_dtype, grad=True).check(grad(implementation), expected)


def test_config_and_keras_file_round_trip(tmp_path, rng):
    layer = layers.CenterZero(size=3, implementation="xla")
    config = layer.get_config()
    assert config["size"] == (3, 3) and config["implementation"] == "xla"
    assert layers.CenterZero.from_config(config).get_config() == config
    model = keras.Sequential([keras.Input((6, 6)), layer])
    path = tmp_path / "center.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = rng.standard_normal((2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert layer.weights == []


def test_built_at_construction_with_no_parameters():
    layer = layers.CenterZero()
    assert layer.built and layer.count_params() == 0
    # Built at construction, it still checks the window against each input.
    with pytest.raises(ValueError, match=r"size=\(3, 3\), inputs.shape=\(1, 2, 5\)"):
        layers.CenterZero(3)(np.ones((1, 2, 5), np.float32))


def test_compute_output_shape():
    assert layers.CenterZero().compute_output_shape((None, 3, 10, 10)) == (None, 3, 10, 10)


def test_window_larger_than_input_raises():
    with pytest.raises(ValueError, match=r"size=\(3, 2\), inputs.shape=\(1, 2, 5\)"):
        layers.CenterZero((3, 2))(np.ones((1, 2, 5), np.float32))
    with pytest.raises(ValueError, match=r"size=\(2, 6\), inputs.shape=\(None, 4, 5\)"):
        layers.CenterZero((2, 6)).compute_output_shape((None, 4, 5))


def test_wrong_rank_and_bad_size_raise():
    with pytest.raises(ValueError, match=r"expected min_ndim=2, found ndim=1"):
        layers.CenterZero()(np.ones((5,), np.float32))
    with pytest.raises(ValueError, match=r"rank 2 or more.*inputs.shape=\(5,\)"):
        kernels.center_zero(np.ones((5,), np.float32))
    with pytest.raises(ValueError, match=r"`size`.*Received: size=\(2, 0\)"):
        layers.CenterZero((2, 0))
    with pytest.raises(ValueError, match=r"must be known.*inputs.shape=\(None, None, 4\)"):
        layers.CenterZero().compute_output_shape((None, None, 4))
