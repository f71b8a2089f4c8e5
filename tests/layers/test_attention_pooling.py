"""kernels.attention_pooling and layers.AttentionPooling against a numpy oracle."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import IMPLEMENTATIONS, round_to
from oracles import pooling_oracle

from fastlayers import kernels, layers
from fastlayers.kernels import tolerance


@pytest.mark.parametrize(
    "dtype, per_step_bias",
    [("float32", False), ("float32", True), ("float16", False), ("bfloat16", False)],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kernel_matches_numpy(rng, implementation, dtype, per_step_bias):
    x = round_to(rng.standard_normal((3, 11, 6)), dtype)
    weight = round_to(rng.standard_normal((6, 1)), dtype)
    bias = round_to(rng.standard_normal((11, 1) if per_step_bias else (1,)), dtype)
    mask = rng.random((3, 11)) > 0.3
    mask[2] = False  # a sequence with every step masked pools to zeros
    for m in (None, mask):
        out = kernels.attention_pooling(
            tf.constant(x, dtype),
            tf.constant(weight, dtype),
            tf.constant(bias, dtype),
            None if m is None else tf.constant(m),
            implementation=implementation,
        )
        assert out.dtype == tf.as_dtype(dtype) and out.shape == (3, 6)
        tolerance(dtype).check(out.numpy(), pooling_oracle(x, weight, bias, m))
    np.testing.assert_array_equal(out.numpy()[2].astype(np.float64), 0.0)


@pytest.mark.parametrize("implementation", ["graph", "xla"])
def test_kernel_gradients_match_reference(rng, implementation):
    x = tf.constant(rng.standard_normal((3, 9, 5)), tf.float32)
    weight = tf.constant(rng.standard_normal((5, 1)), tf.float32)
    bias = tf.constant(rng.standard_normal((9, 1)), tf.float32)
    mask = tf.constant(rng.random((3, 9)) > 0.3)

    def grads(impl):
        with tf.GradientTape() as tape:
            tape.watch([x, weight, bias])
            out = kernels.attention_pooling(x, weight, bias, mask, implementation=impl)
            loss = tf.reduce_sum(out * tf.range(5, dtype=tf.float32))
        return tape.gradient(loss, [x, weight, bias])

    for got, want in zip(grads(implementation), grads("reference")):
        assert not np.isnan(got.numpy()).any()
        tolerance("float32", grad=True).check(got, want)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_layer_under_every_policy(policy, rng, implementation):
    layer = layers.AttentionPooling(implementation=implementation)
    x = rng.standard_normal((4, 7, 5)).astype(np.float32)
    out = layer(x)
    assert out.dtype == policy.compute_dtype and out.shape == (4, 5)
    assert [w.dtype for w in layer.weights] == [policy.variable_dtype] * 2
    weight, bias = (np.asarray(w) for w in layer.weights)
    dtype = policy.compute_dtype
    expected = pooling_oracle(round_to(x, dtype), round_to(weight, dtype), round_to(bias, dtype))
    tolerance(dtype).check(np.asarray(out, np.float64), expected)


def test_layer_uses_the_keras_mask(rng):
    ids = np.array([[4, 2, 7, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    embed = keras.layers.Embedding(10, 6, mask_zero=True)
    layer = layers.AttentionPooling()
    out = layer(embed(ids))
    assert getattr(out, "_keras_mask", None) is None
    x = np.asarray(embed(ids))
    weight, bias = (np.asarray(w) for w in layer.weights)
    tolerance("float32").check(out, pooling_oracle(x, weight, bias, ids > 0))
    np.testing.assert_array_equal(np.asarray(out)[1], 0.0)
    # Padding changes nothing: the first row pools like its unpadded self.
    short = layer(embed(ids[:1, :3]))
    tolerance("float32").check(short, np.asarray(out)[:1])


def test_shared_bias_pools_any_length(rng):
    layer = layers.AttentionPooling()
    layer(rng.standard_normal((2, 5, 3)).astype(np.float32))
    assert layer.attention_bias.shape == (1,)
    assert layer(rng.standard_normal((2, 17, 3)).astype(np.float32)).shape == (2, 3)


def test_per_step_bias_is_the_tutorials_and_fixes_the_length(rng):
    layer = layers.AttentionPooling(per_step_bias=True)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    layer(x)
    assert [tuple(w.shape) for w in layer.weights] == [(3, 1), (5, 1)]
    assert [w.name for w in layer.weights] == ["attention_weight", "attention_bias"]
    with pytest.raises(ValueError, match=r"expected axis 1 of input shape to have value 5"):
        layer(rng.standard_normal((2, 6, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"fixed number of time steps.*input_shape=\(None, None, 3\)"):
        layers.AttentionPooling(per_step_bias=True).build((None, None, 3))


def test_compute_output_shape_and_symbolic_call():
    layer = layers.AttentionPooling()
    assert layer.compute_output_shape((None, 12, 8)) == (None, 8)
    inputs = keras.Input((12, 8))
    assert layer(inputs).shape == (None, 8)


def test_trains_and_round_trips(tmp_path, rng):
    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, 8, mask_zero=True)(inputs)
    x = layers.AttentionPooling(implementation="graph")(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    ids = rng.integers(0, 20, size=(64, 10))
    y = (ids == 3).sum(axis=1, keepdims=True).astype(np.float32)
    before = model.evaluate(ids, y, verbose=0)
    model.fit(ids, y, epochs=3, batch_size=16, verbose=0)
    assert model.evaluate(ids, y, verbose=0) < before
    path = tmp_path / "pool.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert restored.layers[2].get_config() == model.layers[2].get_config()
    np.testing.assert_allclose(restored.predict(ids, verbose=0), model.predict(ids, verbose=0), rtol=1e-6)


def test_config():
    layer = layers.AttentionPooling(per_step_bias=True, implementation="xla", name="pool")
    config = layer.get_config()
    assert config["per_step_bias"] is True and config["implementation"] == "xla"
    assert layers.AttentionPooling.from_config(config).get_config() == config


def test_bad_input(rng):
    with pytest.raises(ValueError, match=r"Received: per_step_bias='yes'"):
        layers.AttentionPooling(per_step_bias="yes")
    x = tf.zeros([2, 5, 3])
    with pytest.raises(ValueError, match=r"`weight` must have shape \(F, 1\) = \(3, 1\). Received: weight.shape=\(4, 1\)"):
        kernels.attention_pooling(x, tf.zeros([4, 1]), tf.zeros([1]))
    with pytest.raises(ValueError, match=r"Received: bias.shape=\(6, 1\)"):
        kernels.attention_pooling(x, tf.zeros([3, 1]), tf.zeros([6, 1]))
    with pytest.raises(ValueError, match=r"`mask` must have shape \[B, T\] = \[2, 5\]. Received: mask.shape=\(2, 4\)"):
        kernels.attention_pooling(x, tf.zeros([3, 1]), tf.zeros([1]), tf.ones([2, 4], tf.bool))
    with pytest.raises(ValueError, match=r"Received: x.shape=\(2, 3\)"):
        kernels.attention_pooling(tf.zeros([2, 3]), tf.zeros([3, 1]), tf.zeros([1]))
