"""ResidualProjection: [a·kernel + b, mean(b)] against numpy; shapes as lists; 2-in 2-out."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import COMPILED, IMPLEMENTATIONS, round_to

from fastlayers import kernels, layers


def _build(units, implementation=None, a_dim=6):
    layer = layers.ResidualProjection(units, implementation=implementation)
    layer.build([(None, a_dim), (None, units)])
    return layer


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_numpy_under_every_policy(implementation, policy, rng):
    for leading in [(5,), (2, 3)]:
        a = rng.standard_normal(leading + (6,)).astype(np.float32)
        b = rng.standard_normal(leading + (4,)).astype(np.float32)
        layer = layers.ResidualProjection(4, implementation=implementation)
        y, mean = layer([a, b])
        dtype = policy.compute_dtype
        assert y.dtype == dtype and mean.dtype == dtype
        assert layer.kernel.dtype == policy.variable_dtype
        kernel = round_to(layer.kernel.numpy(), dtype)
        a64, b64 = round_to(a, dtype), round_to(b, dtype)
        kernels.tolerance(dtype).check(y, round_to(a64 @ kernel + b64, dtype), what=f"y {leading}")
        kernels.tolerance(dtype).check(
            mean, round_to(b64.mean(axis=-1), dtype), what=f"mean {leading}"
        )


@pytest.mark.parametrize("implementation", COMPILED)
def test_compiled_gradients_match_reference(implementation, policy, rng):
    a = tf.constant(rng.standard_normal((5, 6)).astype(np.float32))
    b = tf.constant(rng.standard_normal((5, 4)).astype(np.float32))
    reference = _build(4, "reference")
    compiled = _build(4, implementation)
    compiled.set_weights(reference.get_weights())

    def grads(layer):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y, mean = layer([a, b])
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2) + tf.reduce_sum(
                tf.cast(mean, tf.float32) * 3.0
            )
        return tape.gradient(loss, [a, b, layer.kernel])

    tol = kernels.tolerance(policy.compute_dtype, grad=True)
    for name, actual, expected in zip("abk", grads(compiled), grads(reference), strict=True):
        scale = np.abs(expected.numpy()).max()  # gradients of a squared norm grow with it
        tol.check(np.asarray(actual) / scale, np.asarray(expected) / scale, what=f"d{name}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_match_numpy(implementation, rng):
    # loss = sum(Y²) + sum(3·mean(b)) with Y = a·K + b over N = units columns:
    # dY = 2Y, so da = 2Y·Kᵀ, dK = aᵀ·2Y (over every leading axis), db = 2Y + 3/N.
    units = 4
    a = tf.constant(rng.standard_normal((2, 3, 6)).astype(np.float32))
    b = tf.constant(rng.standard_normal((2, 3, units)).astype(np.float32))
    layer = layers.ResidualProjection(units, implementation=implementation)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        y, mean = layer([a, b])
        loss = tf.reduce_sum(y**2) + tf.reduce_sum(3.0 * mean)
    da, db, dk = tape.gradient(loss, [a, b, layer.kernel])
    a64, b64 = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    k64 = layer.kernel.numpy().astype(np.float64)
    dy = 2.0 * (a64 @ k64 + b64)
    tol = kernels.tolerance("float32", grad=True)
    tol.check(da, dy @ k64.T, what="da")
    tol.check(db, dy + 3.0 / units, what="db")
    tol.check(dk, a64.reshape(-1, 6).T @ dy.reshape(-1, units), what="dkernel")


def test_two_input_two_output_model_fits(rng):
    a_in, b_in = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    y, mean = layers.ResidualProjection(4)([a_in, b_in])
    model = keras.Model([a_in, b_in], [y, mean])
    assert [tuple(o.shape) for o in model.outputs] == [(None, 4), (None,)]
    model.compile(keras.optimizers.Adam(0.05), ["mse", "mse"])
    a = rng.standard_normal((64, 6)).astype(np.float32)
    b = rng.standard_normal((64, 4)).astype(np.float32)
    target = a[:, :4] * 2.0 + b
    before = model.evaluate([a, b], [target, b.mean(-1)], verbose=0)[0]
    model.fit([a, b], [target, b.mean(-1)], epochs=4, batch_size=16, verbose=0)
    after = model.evaluate([a, b], [target, b.mean(-1)], verbose=0)[0]
    assert after < before


def test_compute_output_shape_over_lists():
    layer = layers.ResidualProjection(4)
    assert layer.compute_output_shape([(None, 3, 6), (None, 3, 4)]) == [(None, 3, 4), (None, 3)]


@pytest.mark.parametrize(
    "shapes, expected",
    [
        # The first output's last axis is `units` even where b's is unknown.
        ([(None, None, 6), (None, 3, None)], [(None, 3, 4), (None, 3)]),
        # A leading axis known in a alone is known in the outputs.
        ([(None, 3, 6), (None, None, 4)], [(None, 3, 4), (None, 3)]),
        ([(2, None, 6), (None, 5, 4)], [(2, 5, 4), (2, 5)]),
        ([(None, 6), (None, None)], [(None, 4), (None,)]),
    ],
)
def test_compute_output_shape_merges_known_axes(shapes, expected):
    assert layers.ResidualProjection(4).compute_output_shape(shapes) == expected


def test_symbolic_outputs_keep_every_known_axis():
    y, mean = layers.ResidualProjection(4)([keras.Input((3, 6)), keras.Input((None, 4))])
    assert (tuple(y.shape), tuple(mean.shape)) == ((None, 3, 4), (None, 3))
    y, mean = layers.ResidualProjection(4)([keras.Input((None, 6)), keras.Input((3, None))])
    assert (tuple(y.shape), tuple(mean.shape)) == ((None, 3, 4), (None, 3))


def test_config_and_keras_file_round_trip(tmp_path, rng):
    a_in, b_in = keras.Input((6,)), keras.Input((4,))
    layer = layers.ResidualProjection(4, kernel_initializer="random_uniform", implementation="xla")
    model = keras.Model([a_in, b_in], layer([a_in, b_in]))
    config = layer.get_config()
    assert config["units"] == 4 and config["implementation"] == "xla"
    assert layers.ResidualProjection.from_config(config).get_config() == config
    path = tmp_path / "residual.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    inputs = [rng.standard_normal((3, n)).astype(np.float32) for n in (6, 4)]
    for got, want in zip(loaded(inputs), model(inputs), strict=True):
        np.testing.assert_array_equal(got, want)


def test_input_that_is_not_a_pair_raises():
    layer = layers.ResidualProjection(4)
    expects = r"expects a list of two inputs \[a, b\]. "
    with pytest.raises(ValueError, match=expects + r"Received: input_shape=\[\(None, 6\)\]$"):
        layer.compute_output_shape([(None, 6)])
    with pytest.raises(ValueError, match=expects + r"Received: input_shape=\(2, 6\)$"):
        layer(np.ones((2, 6), np.float32))
    three = r"Received: input_shape=\[\(2, 6\), \(2, 6\), \(2, 6\)\]$"
    with pytest.raises(ValueError, match=expects + three):
        layer([np.ones((2, 6), np.float32)] * 3)


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([(2, 6), (2, 5)], r"last axis of `b`.*b.shape=\(2, 5\)"),
        ([(2, 6), (3, 4)], r"same leading axes.*a.shape=\(2, 6\), b.shape=\(3, 4\)"),
        ([(2, 3, 6), (2, 4)], r"same rank.*a.shape=\(2, 3, 6\), b.shape=\(2, 4\)"),
        ([(6,), (4,)], r"same rank, 2 or more.*a.shape=\(6,\)"),
    ],
)
def test_shapes_that_disagree_raise(shapes, message):
    a, b = (np.ones(s, np.float32) for s in shapes)
    with pytest.raises(ValueError, match=message):
        layers.ResidualProjection(4)([a, b])


def test_kernel_that_disagrees_with_a_raises():
    layer = _build(4, a_dim=6)
    a, b = np.ones((2, 5), np.float32), np.ones((2, 4), np.float32)
    message = r"a.shape=\(2, 5\), b.shape=\(2, 4\), kernel.shape=\(6, 4\)"
    with pytest.raises(ValueError, match=message):
        kernels.residual_projection(a, b, layer.kernel)
    with pytest.raises(ValueError, match=r"`units`.*Received: units=0"):
        layers.ResidualProjection(0)
