"""layers.GroupQueryAttention as a drop-in for keras.layers.GroupQueryAttention."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import IMPLEMENTATIONS

from fastlayers import kernels, layers
from fastlayers.kernels import tolerance

CONFIG = dict(head_dim=8, num_query_heads=4, num_key_value_heads=2)


def twins(implementation=None, query_shape=(2, 11, 12), value_shape=(2, 13, 10), key_shape=None, **config):
    """A Keras layer and ours, built on the same shapes, with the same weights."""
    config = {**CONFIG, **config}
    theirs = keras.layers.GroupQueryAttention(**config)
    ours = layers.GroupQueryAttention(**config, implementation=implementation)
    build = [np.ones(shape, np.float32) for shape in (query_shape, value_shape)]
    key = None if key_shape is None else np.ones(key_shape, np.float32)
    theirs(*build, key=key)
    ours(*build, key=key)
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def _check(actual, expected, dtype="float32"):
    assert tuple(actual.shape) == tuple(expected.shape)
    tolerance(dtype).check(np.asarray(actual, np.float64), np.asarray(expected, np.float64))


OPTIONS = {
    "full": {}, "causal": {"use_causal_mask": True}, "window": {"sliding_window": 3},
    "causal-window": {"sliding_window": 4, "use_causal_mask": True},
    "gate-w1": {"use_gate": True, "sliding_window": 1}, "mqa-nobias": {"use_bias": False, "num_key_value_heads": 1},
}
# XLA (and auto, which takes it on CPUs without oneDNN) compiles a program per case:
# two cases by default, the rest under -m slow.
SWEEP = [
    pytest.param(implementation, options, id=f"{implementation}-{name}",
                 marks=[pytest.mark.slow] if implementation in (None, "xla") and name not in ("causal-window", "gate-w1") else [])
    for implementation in IMPLEMENTATIONS
    for name, options in OPTIONS.items()
]


@pytest.mark.parametrize("implementation, options", SWEEP)
def test_matches_keras(rng, implementation, options):
    options = dict(options)
    causal = options.pop("use_causal_mask", False)
    theirs, ours = twins(implementation, value_shape=(2, 11, 10), **options)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    query = rng.standard_normal((2, 11, 12)).astype(np.float32)
    value = rng.standard_normal((2, 11, 10)).astype(np.float32)
    _check(ours(query, value, use_causal_mask=causal), theirs(query, value, use_causal_mask=causal))


def test_matches_keras_under_every_policy(policy, rng):
    theirs, ours = twins("graph", sliding_window=5)
    assert all(w.dtype == policy.variable_dtype for w in ours.weights)
    query = rng.standard_normal((2, 11, 12)).astype(np.float32)
    value = rng.standard_normal((2, 13, 10)).astype(np.float32)
    key = rng.standard_normal((2, 13, 10)).astype(np.float32)
    expected = theirs(query, value, key=key, use_causal_mask=True)
    actual = ours(query, value, key=key, use_causal_mask=True)
    assert actual.dtype == expected.dtype == policy.compute_dtype
    _check(actual, expected, policy.compute_dtype)


def test_masks_match_keras(rng):
    theirs, ours = twins("graph", sliding_window=6)
    query = rng.standard_normal((2, 11, 12)).astype(np.float32)
    value = rng.standard_normal((2, 13, 10)).astype(np.float32)
    # Every query row keeps its own position's key: no row is fully masked (where
    # Keras averages the values and ours gives zeros).
    attention_mask = rng.random((2, 11, 13)) > 0.5
    attention_mask[:, np.arange(11), np.arange(11)] = True
    value_mask = np.ones((2, 13), bool)
    value_mask[1, 11:] = False
    query_mask = np.ones((2, 11), bool)
    query_mask[0, 9:] = False
    kwargs = dict(attention_mask=attention_mask, value_mask=value_mask, query_mask=query_mask)
    expected = np.asarray(theirs(query, value, **kwargs, use_causal_mask=True))
    actual = np.asarray(ours(query, value, **kwargs, use_causal_mask=True))
    # Rows the query mask hides see no key: Keras averages there, ours is zeros.
    _check(actual[query_mask], expected[query_mask])
    # Keras masks through the inputs' own masks too.
    embedded_q = keras.layers.Masking(0.0)(np.where(query_mask[..., None], query, 0.0))
    embedded_v = keras.layers.Masking(0.0)(np.where(value_mask[..., None], value, 0.0))
    expected = np.asarray(theirs(embedded_q, embedded_v))
    actual = np.asarray(ours(keras.layers.Masking(0.0)(np.where(query_mask[..., None], query, 0.0)),
                             keras.layers.Masking(0.0)(np.where(value_mask[..., None], value, 0.0))))
    _check(actual[query_mask], expected[query_mask])


def test_a_row_that_sees_no_key_attends_to_nothing(rng):
    _, ours = twins("graph", use_bias=False)
    query = rng.standard_normal((1, 4, 12)).astype(np.float32)
    value = rng.standard_normal((1, 5, 10)).astype(np.float32)
    mask = np.ones((1, 4, 5), bool)
    mask[0, 2] = False
    out = ours(query, value, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(out)[0, 2], 0.0)


def test_key_value_heads_are_not_repeated(rng, monkeypatch):
    seen = []
    real = kernels.dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((tuple(query.shape), tuple(key.shape), tuple(value.shape), kwargs["sliding_window"]))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(kernels, "dot_product_attention", spy)
    _, ours = twins("graph", sliding_window=3)
    ours(rng.standard_normal((2, 11, 12)), rng.standard_normal((2, 13, 10)))
    assert seen[-1] == ((2, 11, 4, 8), (2, 13, 2, 8), (2, 13, 2, 8), 3)


def test_scores_come_from_keras(rng):
    theirs, ours = twins("graph", sliding_window=2)
    query = rng.standard_normal((2, 11, 12)).astype(np.float32)
    value = rng.standard_normal((2, 13, 10)).astype(np.float32)
    expected, expected_scores = theirs(query, value, return_attention_scores=True, use_causal_mask=True)
    actual, scores = ours(query, value, return_attention_scores=True, use_causal_mask=True)
    _check(actual, expected)
    _check(scores, expected_scores)
    assert tuple(scores.shape) == (2, 4, 11, 13)


def test_dropout_in_training_only(rng):
    _, ours = twins("graph", dropout=0.5, seed=3, sliding_window=4)
    query = rng.standard_normal((2, 11, 12)).astype(np.float32)
    value = rng.standard_normal((2, 13, 10)).astype(np.float32)
    inference = ours(query, value)
    _check(ours(query, value, training=False), inference)
    first, second = ours(query, value, training=True), ours(query, value, training=True)
    assert not np.allclose(first, inference)
    assert not np.allclose(first, second)  # a new seed each step
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(ours(query, value, training=True) ** 2)
    grads = tape.gradient(loss, ours.trainable_weights)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)


def test_trains_in_a_model(rng):
    inputs = keras.Input((9, 12))
    x = layers.GroupQueryAttention(8, 4, 2, sliding_window=3, dropout=0.1, implementation="graph")(
        inputs, inputs, use_causal_mask=True)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(x)))
    model.compile("adam", "mse")
    history = model.fit(rng.standard_normal((8, 9, 12)), rng.standard_normal((8, 1)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_keras_file_round_trip(tmp_path, rng):
    inputs = keras.Input((9, 12))
    outputs = layers.GroupedQueryAttention(8, 4, 2, sliding_window=3, use_gate=True,
                                           implementation="graph")(inputs, inputs, use_causal_mask=True)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "gqa.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    layer = loaded.layers[-1]
    assert type(layer) is layers.GroupQueryAttention
    assert layer.implementation == "graph" and layer.sliding_window == 3 and layer.use_gate
    x = rng.standard_normal((2, 9, 12)).astype(np.float32)
    _check(loaded(x), model(x))


def test_config_is_keras_plus_implementation():
    layer = layers.GroupQueryAttention(8, 4, 2, dropout=0.2, sliding_window=5, seed=4, implementation="xla")
    config = layer.get_config()
    keras_config = keras.layers.GroupQueryAttention(8, 4, 2, dropout=0.2, sliding_window=5, seed=4).get_config()
    assert set(config) == set(keras_config) | {"implementation"}
    clone = layers.GroupQueryAttention.from_config(config)
    assert clone.implementation == "xla" and clone.sliding_window == 5 and clone.seed == 4
    assert layers.GroupedQueryAttention is layers.GroupQueryAttention


def test_bad_arguments():
    with pytest.raises(ValueError, match="Received an invalid value for `implementation`"):
        layers.GroupQueryAttention(8, 4, 2, implementation="fast")
    with pytest.raises(ValueError, match="`sliding_window` must be `None` or a positive integer"):
        layers.GroupQueryAttention(8, 4, 2, sliding_window=0)
    with pytest.raises(ValueError, match="`num_query_heads` must be divisible by `num_key_value_heads`"):
        layers.GroupQueryAttention(8, 4, 3)


def test_bad_inputs_name_the_shapes(rng):
    _, ours = twins("graph")
    query = rng.standard_normal((2, 11, 12)).astype(np.float32)
    value = rng.standard_normal((2, 13, 10)).astype(np.float32)
    with pytest.raises(ValueError, match=r"must have the same rank.*query.shape=\(2, 11, 12\), value.shape=\(2, 13\)"):
        ours(query, value[..., 0])
    with pytest.raises(ValueError, match=r"last axis of `query` .* must be 12.*query.shape=\(2, 11, 7\)"):
        ours(query[..., :7], value)
    with pytest.raises(ValueError, match=r"last axis of `value` .* must be 10.*value.shape=\(2, 13, 9\)"):
        ours(query, value[..., :9])
    with pytest.raises(ValueError, match=r"last axis of `key` .* must be 10.*key.shape=\(2, 13, 4\)"):
        ours(query, value, key=value[..., :4])


@pytest.mark.parametrize("shapes", [((2, 0, 12), (2, 13, 10)), ((2, 11, 12), (2, 0, 10)), ((0, 11, 12), (0, 13, 10))],
                         ids=["T=0", "S=0", "B=0"])
def test_empty_inputs_match_keras(rng, shapes):
    theirs, ours = twins("graph", sliding_window=3)
    query, value = (tf.constant(rng.standard_normal(shape), tf.float32) for shape in shapes)
    _check(ours(query, value, use_causal_mask=True), theirs(query, value, use_causal_mask=True))
    generic = tf.function(lambda q, v: ours(q, v, use_causal_mask=True),
                          input_signature=[tf.TensorSpec([None, None, 12]), tf.TensorSpec([None, None, 10])])
    _check(generic(query, value), theirs(query, value, use_causal_mask=True))
    with tf.GradientTape() as tape:
        tape.watch([query, value])
        loss = tf.reduce_sum(ours(query, value) ** 2)
    for grad, x in zip(tape.gradient(loss, [query, value], unconnected_gradients="zero"), [query, value], strict=True):
        assert tuple(grad.shape) == tuple(x.shape) and np.isfinite(grad.numpy()).all()
