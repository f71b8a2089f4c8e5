"""FixedMask: a constant mask times the input, saved in the config, never a weight."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import COMPILED, IMPLEMENTATIONS, round_to

from fastlayers import kernels, layers

MASK = np.array([[1.0, 0.0, 0.5, 2.0], [0.25, 1.0, 0.0, -1.0], [1.0, 1.0, 3.0, 0.0]])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_numpy_under_every_policy(implementation, policy, rng):
    x = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)  # mask broadcasts over axis 1
    layer = layers.FixedMask(MASK, implementation=implementation)
    y = layer(x)
    dtype = policy.compute_dtype
    assert y.dtype == dtype
    expected = round_to(round_to(x, dtype) * round_to(MASK, dtype), dtype)
    kernels.tolerance(dtype).check(y, expected)


@pytest.mark.parametrize("implementation", COMPILED)
def test_compiled_gradients_match_reference(implementation, policy, rng):
    x = tf.constant(rng.standard_normal((2, 3, 4)).astype(np.float32))

    def grad(impl):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layers.FixedMask(MASK, implementation=impl)(x)
        return tape.gradient(y, x, output_gradients=tf.ones_like(y))

    expected = grad("reference")
    np.testing.assert_allclose(expected[0], round_to(MASK, policy.compute_dtype))
    kernels.tolerance(policy.compute_dtype, grad=True).check(grad(implementation), expected)


def test_mask_is_not_a_weight():
    layer = layers.FixedMask(MASK)
    layer(np.ones((2, 3, 4), np.float32))
    assert layer.weights == [] and layer.trainable_weights == []
    model = keras.Sequential([keras.Input((3, 4)), layer, keras.layers.Dense(1)])
    assert len(model.trainable_weights) == 2  # the Dense kernel and bias only


def test_config_holds_the_mask_as_a_nested_list():
    config = layers.FixedMask(MASK, implementation="graph").get_config()
    assert config["mask"] == MASK.tolist()
    assert isinstance(config["mask"][0], list)
    clone = layers.FixedMask.from_config(config)
    np.testing.assert_array_equal(clone.mask, MASK)
    assert clone.get_config() == config


def test_keras_file_round_trip_in_safe_mode(tmp_path, rng):
    model = keras.Sequential([keras.Input((3, 4)), layers.FixedMask(MASK)])
    path = tmp_path / "mask.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))
    np.testing.assert_array_equal(loaded.layers[0].mask, MASK)


def test_built_at_construction_with_no_parameters():
    layer = layers.FixedMask(MASK)
    assert layer.built and layer.count_params() == 0


def test_compute_output_shape():
    layer = layers.FixedMask(MASK)
    assert layer.compute_output_shape((None, 7, 3, 4)) == (None, 7, 3, 4)
    assert layers.FixedMask([[1.0], [0.0], [1.0]]).compute_output_shape((2, 3, 4)) == (2, 3, 4)


def test_mask_that_cannot_broadcast_raises():
    message = r"mask.shape=\(3, 4\), inputs.shape=\(2, 4, 3\)"
    with pytest.raises(ValueError, match=message):
        layers.FixedMask(MASK)(np.ones((2, 4, 3), np.float32))
    # A mask that would grow the input is refused too: its output would not be the input's shape.
    with pytest.raises(ValueError, match=r"mask.shape=\(2, 3, 4\), inputs.shape=\(None, 3, 4\)"):
        layers.FixedMask(np.ones((2, 3, 4))).compute_output_shape((None, 3, 4))
    with pytest.raises(ValueError, match=r"mask.shape=\(3, 4\), inputs.shape=\(5, 4\)"):
        kernels.fixed_mask(np.ones((5, 4), np.float32), MASK)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mask_that_would_grow_an_unknown_axis_fails_at_run_time(implementation):
    layer = layers.FixedMask(MASK, implementation=implementation)
    traced = tf.function(layer, input_signature=[tf.TensorSpec([None, None, 4], tf.float32)])
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(traced(x), x * MASK)  # the axis fits when it is run
    # (2, 1, 4) * (3, 4) broadcasts to (2, 3, 4): the layer must refuse, not grow x.
    message = (
        r"Received: mask.shape=\] \[3 4\] \[inputs.shape=\] \[2 1 4\]"
        if implementation != "xla"
        else r"24 values.*8"  # XLA drops assertions; the reshape fails
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        traced(np.ones((2, 1, 4), np.float32))


def test_known_axes_take_a_plain_product():
    graph = tf.function(lambda x: kernels.fixed_mask(x, MASK, implementation="reference"))
    known = graph.get_concrete_function(tf.TensorSpec([None, 3, 4], tf.float32))
    assert "Reshape" not in {op.type for op in known.graph.get_operations()}
    unknown = graph.get_concrete_function(tf.TensorSpec([None, None, 4], tf.float32))
    assert "Reshape" in {op.type for op in unknown.graph.get_operations()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mask_with_a_leading_batch_axis_of_one(implementation, rng):
    # x (B, 3, 4) * mask (1, 3, 4) is numpy's broadcast over the batch.
    mask = MASK[None]
    layer = layers.FixedMask(mask, implementation=implementation)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(layer(x), x * mask, rtol=1e-6)
    assert layer.compute_output_shape((None, 3, 4)) == (None, 3, 4)
    assert tuple(layer(keras.Input((3, 4))).shape) == (None, 3, 4)
    config = layer.get_config()
    assert config["mask"] == mask.tolist()  # saved as given, leading axis included
    clone = layers.FixedMask.from_config(config)
    assert clone.get_config() == config and clone.mask.shape == (1, 3, 4)
    np.testing.assert_allclose(clone(x), x * mask, rtol=1e-6)
    np.testing.assert_allclose(kernels.fixed_mask(x, mask), x * mask, rtol=1e-6)
    # On a deeper input the leading 1 is an ordinary broadcast axis, not the batch.
    deeper = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(layer(deeper), deeper * mask, rtol=1e-6)


def test_input_of_lower_rank_than_the_mask_raises():
    message = r"rank 3 or more.*Received: mask.shape=\(3, 4\), inputs.shape=\(3, 4\)"
    with pytest.raises(ValueError, match=message):
        layers.FixedMask(MASK)(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"rank 3 or more.*inputs.shape=\(None, 4\)"):
        layers.FixedMask(MASK)(keras.Input((4,)))
    with pytest.raises(ValueError, match=r"rank 3 or more.*inputs.shape=\(4,\)"):
        layers.FixedMask(MASK[None])(np.ones((4,), np.float32))
    with pytest.raises(ValueError, match=r"rank 3 or more.*inputs.shape=\(3, 4\)"):
        kernels.fixed_mask(np.ones((3, 4), np.float32), MASK)


def test_bad_mask_raises():
    with pytest.raises(ValueError, match=r"`mask`.*Received: mask='ones'"):
        layers.FixedMask("ones")
    with pytest.raises(ValueError, match=r"`mask`.*Received: mask=\[\[1.0\], \[1.0, 2.0\]\]"):
        layers.FixedMask([[1.0], [1.0, 2.0]])
