"""Exponential: exp against numpy, safe-mode loading where a Lambda fails, float16 overflow."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import COMPILED, IMPLEMENTATIONS, round_to

from fastlayers import kernels, layers

FLOAT16_EXP_LIMIT = np.log(np.finfo(np.float16).max)  # ≈ 11.09


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_numpy_under_every_policy(implementation, policy, rng):
    x = rng.uniform(-4.0, 4.0, size=(3, 5, 7)).astype(np.float32)
    y = layers.Exponential(implementation=implementation)(x)
    dtype = policy.compute_dtype
    assert y.dtype == dtype
    expected = round_to(np.exp(round_to(x, dtype)), dtype)
    # Relative error: exp's outputs span e^-4 to e^4.
    kernels.tolerance(dtype).check(np.asarray(y, np.float64) / expected, np.ones_like(expected))


def test_built_at_construction_with_no_parameters():
    layer = layers.Exponential()
    assert layer.built and layer.count_params() == 0


@pytest.mark.parametrize("implementation", COMPILED)
def test_compiled_gradients_match_reference(implementation, policy, rng):
    x = tf.constant(rng.uniform(-2.0, 2.0, size=(4, 6)).astype(np.float32))

    def grad(impl):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layers.Exponential(implementation=impl)(x)
        return tape.gradient(y, x, output_gradients=tf.ones_like(y))

    expected = grad("reference")
    tol = kernels.tolerance(policy.compute_dtype, grad=True)
    tol.check(grad(implementation), expected)
    # d exp(x) / dx = exp(x): the reference itself, relative to the float64 truth.
    tol.check(np.asarray(expected, np.float64) / np.exp(x.numpy()), np.ones(x.shape))


@pytest.mark.parametrize("policy_name", ["float16", "mixed_float16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float16_overflows_to_inf_above_ln_65504(policy_name, implementation):
    # Documented behaviour: exp in float16 is inf past ln(65504), as tf.exp gives.
    keras.config.set_dtype_policy(policy_name)
    x = np.array([[11.0, 11.08, 11.1, 12.0, 100.0]], np.float32)
    y = layers.Exponential(implementation=implementation)(x).numpy()
    assert y.dtype == np.float16
    assert np.all(np.isfinite(y[0, :2])) and np.all(np.isinf(y[0, 2:]))
    np.testing.assert_array_equal(y, tf.exp(tf.cast(x, tf.float16)).numpy())
    assert 11.08 < FLOAT16_EXP_LIMIT < 11.1


def test_bfloat16_keeps_float32_range():
    keras.config.set_dtype_policy("mixed_bfloat16")
    y = layers.Exponential()(np.array([[12.0, 80.0]], np.float32)).numpy()
    assert np.all(np.isfinite(y.astype(np.float32)))


def _save(model, path):
    model.save(path)
    return path


def test_model_loads_in_safe_mode_where_the_lambda_version_does_not(tmp_path, rng):
    ours = keras.Sequential([keras.Input((4,)), layers.Exponential(), keras.layers.Dense(2)])
    lam = keras.Sequential(
        [keras.Input((4,)), keras.layers.Lambda(lambda x: tf.exp(x)), keras.layers.Dense(2)]
    )
    ours_path = _save(ours, tmp_path / "exp.keras")
    lambda_path = _save(lam, tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(lambda_path, safe_mode=True)
    loaded = keras.saving.load_model(ours_path, safe_mode=True)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), ours(x))


def test_config_round_trip_and_shape():
    layer = layers.Exponential(implementation="graph", name="exp")
    config = layer.get_config()
    assert config["implementation"] == "graph"
    assert layers.Exponential.from_config(config).get_config() == config
    assert layer.compute_output_shape((None, 3, 5)) == (None, 3, 5)
    assert layer.weights == []


def test_bad_input_raises():
    with pytest.raises(TypeError, match=r"Received: x.dtype=int32"):
        kernels.exponential(tf.constant([1, 2]))
    with pytest.raises(ValueError, match=r"Received: implementation='jit'"):
        layers.Exponential(implementation="jit")
