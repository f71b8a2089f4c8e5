"""layers.MultiHeadAttention as a drop-in for keras.layers.MultiHeadAttention."""

import concurrent.futures
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import IMPLEMENTATIONS, POLICIES, each_value

from fastlayers import layers
from fastlayers.kernels import tolerance


def twin_layers(implementation, **config):
    """A Keras layer and ours with the same weights."""
    theirs = keras.layers.MultiHeadAttention(**config)
    ours = layers.MultiHeadAttention(**config, implementation=implementation)
    return theirs, ours


def build_and_copy(theirs, ours, query, value, key=None):
    theirs(query, value, key)
    ours(query, value, key)
    ours.set_weights(theirs.get_weights())


# Every policy and every implementation by default (each in turn), the product with -m slow.
@pytest.mark.parametrize("policy, implementation", each_value(POLICIES, IMPLEMENTATIONS), indirect=["policy"])
def test_matches_keras_under_every_policy(policy, rng, implementation):
    theirs, ours = twin_layers(implementation, num_heads=3, key_dim=8, value_dim=5)
    query = rng.standard_normal((2, 13, 12)).astype(np.float32)
    value = rng.standard_normal((2, 17, 10)).astype(np.float32)
    key = rng.standard_normal((2, 17, 6)).astype(np.float32)
    build_and_copy(theirs, ours, query, value, key)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    assert all(w.dtype == policy.variable_dtype for w in ours.weights)
    mask = rng.random((2, 13, 17)) > 0.4
    for kwargs in ({}, {"attention_mask": mask}):
        expected = theirs(query, value, key, **kwargs)
        actual = ours(query, value, key, **kwargs)
        assert actual.dtype == expected.dtype == policy.compute_dtype
        tolerance(policy.compute_dtype).check(
            np.asarray(actual, np.float64), np.asarray(expected, np.float64), what=str(kwargs)
        )


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_every_mask_source_matches_keras(rng, implementation):
    theirs, ours = twin_layers(implementation, num_heads=2, key_dim=4)
    embed = keras.layers.Embedding(10, 8, mask_zero=True)
    ids = {
        "query": np.array([[3, 5, 2, 0, 0], [1, 1, 1, 1, 0]]),
        "value": np.array([[4, 2, 2, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]]),  # 2nd: all masked
        "key": np.array([[1, 1, 0, 0, 1, 1, 1], [2, 2, 2, 0, 0, 0, 0]]),
    }

    def inputs(with_key):
        # Fresh tensors per call: MultiHeadAttention clears its inputs' Keras masks.
        names = ("query", "value", "key") if with_key else ("query", "value")
        return [embed(ids[name]) for name in names]

    build_and_copy(theirs, ours, *inputs(False))
    attention_mask = rng.random((2, 5, 7)) > 0.3
    cases = [
        {},
        {"use_causal_mask": True},
        {"attention_mask": attention_mask},
        {"attention_mask": attention_mask, "use_causal_mask": True},
    ]
    for kwargs in cases:
        for with_key in (False, True):
            expected_tensor = theirs(*inputs(with_key), **kwargs)
            expected = np.asarray(expected_tensor)
            actual = ours(*inputs(with_key), **kwargs)
            what = f"{kwargs} with_key={with_key}"
            # Rows whose keys are all masked: Keras averages every value, ours (and the
            # kernel's contract) attends to nothing, leaving the output bias (zeros).
            allowed = (ids["query"] > 0)[:, :, None] & (ids["value"] > 0)[:, None, :]
            if with_key:
                allowed &= (ids["key"] > 0)[:, None, :]
            if "attention_mask" in kwargs:
                allowed &= attention_mask
            if kwargs.get("use_causal_mask"):
                allowed &= np.tril(np.ones((5, 7), bool))
            seen = allowed.any(axis=-1)
            tolerance("float32").check(np.asarray(actual)[seen], expected[seen], what=what)
            np.testing.assert_array_equal(np.asarray(actual)[~seen], 0.0)
            assert not np.isnan(np.asarray(actual)).any()
            # The query's Keras mask travels to the output, as in Keras.
            np.testing.assert_array_equal(actual._keras_mask, expected_tensor._keras_mask)
    # The masks took effect: without them, the output differs.
    unmasked = ours(*[tf.identity(x) for x in inputs(True)])
    assert np.abs(np.asarray(unmasked) - np.asarray(actual)).max() > 1e-3


@pytest.mark.parametrize("implementation", ["graph", "xla"])
def test_causal_self_attention_matches_keras(rng, implementation):
    theirs, ours = twin_layers(implementation, num_heads=4, key_dim=8)
    x = rng.standard_normal((2, 33, 16)).astype(np.float32)
    build_and_copy(theirs, ours, x, x)
    expected = theirs(x, x, use_causal_mask=True)
    tolerance("float32").check(ours(x, x, use_causal_mask=True), expected)


def test_attention_scores_come_from_the_keras_path(rng):
    theirs, ours = twin_layers("xla", num_heads=2, key_dim=4)
    x = rng.standard_normal((2, 6, 8)).astype(np.float32)
    build_and_copy(theirs, ours, x, x)
    out, scores = ours(x, x, return_attention_scores=True, use_causal_mask=True)
    expected_out, expected_scores = theirs(x, x, return_attention_scores=True, use_causal_mask=True)
    assert scores.shape == (2, 2, 6, 6)
    tolerance("float32").check(scores, expected_scores)
    tolerance("float32").check(out, expected_out)
    np.testing.assert_array_equal(np.triu(np.asarray(scores)[0, 0], k=1), 0.0)


def test_other_attention_axes_fall_back_to_keras(rng):
    theirs, ours = twin_layers("xla", num_heads=2, key_dim=4, attention_axes=(1, 2))
    x = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    build_and_copy(theirs, ours, x, x)
    tolerance("float32").check(ours(x, x), theirs(x, x))


def test_dropout_in_training_only(rng):
    x = rng.standard_normal((4, 16, 8)).astype(np.float32)
    layer = layers.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5, seed=1)
    inference = layer(x, x, training=False)
    np.testing.assert_array_equal(inference, layer(x, x))
    first, second = layer(x, x, training=True), layer(x, x, training=True)
    assert np.abs(np.asarray(first) - np.asarray(inference)).max() > 1e-3
    # A new dropout pattern at every step.
    assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-3
    # Same seed, same sequence of patterns.
    again = layers.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.5, seed=1)
    again(x, x)
    again.set_weights(layer.get_weights()[: len(again.get_weights())])
    np.testing.assert_allclose(again(x, x, training=True), first, rtol=1e-6)


def test_trains_in_a_model(rng):
    tokens = keras.Input((12, 16))
    attended = layers.MultiHeadAttention(num_heads=2, key_dim=8, dropout=0.1)(
        tokens, tokens, use_causal_mask=True
    )
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(attended))
    model = keras.Model(tokens, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = rng.standard_normal((32, 12, 16)).astype(np.float32)
    y = x[:, :, :1].mean(axis=1)
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before
    gradients_reach = [w for w in model.trainable_weights if "query" in w.path]
    assert gradients_reach


def test_keras_file_round_trip(tmp_path, rng):
    tokens = keras.Input((9, 8))
    outputs = layers.MultiHeadAttention(
        num_heads=2, key_dim=4, value_dim=3, output_shape=5, implementation="graph"
    )(tokens, tokens)
    model = keras.Model(tokens, outputs)
    path = tmp_path / "mha.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    layer = restored.layers[-1]
    assert isinstance(layer, layers.MultiHeadAttention)
    assert layer.implementation == "graph"
    x = rng.standard_normal((3, 9, 8)).astype(np.float32)
    np.testing.assert_allclose(restored(x), model(x), rtol=1e-6, atol=1e-6)


def test_config_round_trip():
    layer = layers.MultiHeadAttention(num_heads=4, key_dim=16, dropout=0.2, implementation="xla")
    config = layer.get_config()
    assert config["implementation"] == "xla"
    keras_config = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16, dropout=0.2).get_config()
    assert set(config) - set(keras_config) == {"implementation"}
    clone = layers.MultiHeadAttention.from_config(config)
    assert clone.get_config() == config


def test_bad_input_raises_like_keras():
    with pytest.raises(ValueError, match=r"Received: implementation='fast'"):
        layers.MultiHeadAttention(num_heads=2, key_dim=4, implementation="fast")
    with pytest.raises(ValueError, match=r"Received: num_heads=0"):
        layers.MultiHeadAttention(num_heads=0, key_dim=4)
    layer = layers.MultiHeadAttention(num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=r"value_shape=\(2, 5, 8\) and key_shape=\(2, 6, 8\)"):
        layer(tf.zeros([2, 4, 8]), tf.zeros([2, 5, 8]), tf.zeros([2, 6, 8]))


def test_one_layer_called_from_threads_keeps_each_calls_masking(rng):
    # The causal switch is the layer's, not the kernel's: the eager reference shows a
    # mix-up as well as a compiled path would, at a fraction of the time.
    layer = layers.MultiHeadAttention(num_heads=2, key_dim=8, implementation="reference")
    x = rng.standard_normal((2, 24, 16)).astype(np.float32)
    expected = {causal: np.asarray(layer(x, x, use_causal_mask=causal)) for causal in (True, False)}
    assert np.abs(expected[True] - expected[False]).max() > 1e-3
    barrier = threading.Barrier(4)

    def worker(causal):
        barrier.wait()
        return [np.asarray(layer(x, x, use_causal_mask=causal)) for _ in range(30)]

    modes = (True, False, True, False)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(worker, modes))
    for causal, outputs in zip(modes, results):
        for output in outputs:
            np.testing.assert_allclose(output, expected[causal], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_attention_mask_of_rank_2_3_and_4_as_keras_takes_them(rng, implementation):
    theirs, ours = twin_layers(implementation, num_heads=2, key_dim=4)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    build_and_copy(theirs, ours, x, x)
    per_head = rng.random((2, 2, 5, 5)) > 0.3
    for mask in (per_head[0, 0], per_head[:, 0], per_head):
        tolerance("float32").check(
            ours(x, x, attention_mask=mask), theirs(x, x, attention_mask=mask), what=str(mask.shape)
        )
    # Each head keeps its own mask.
    one_head = ours(x, x, attention_mask=np.repeat(per_head[:, :1], 2, axis=1))
    assert np.abs(np.asarray(ours(x, x, attention_mask=per_head)) - np.asarray(one_head)).max() > 1e-3


def test_causal_mask_with_padding_matches_keras(rng):
    theirs, ours = twin_layers("graph", num_heads=2, key_dim=4)
    x = rng.standard_normal((2, 7, 8)).astype(np.float32)
    build_and_copy(theirs, ours, x, x)
    mask = rng.random((2, 7, 7)) > 0.3
    for kwargs in ({"attention_mask": mask}, {"attention_mask": mask[0]}):
        tolerance("float32").check(
            ours(x, x, use_causal_mask=True, **kwargs), theirs(x, x, use_causal_mask=True, **kwargs)
        )


class OlderSignature(layers.MultiHeadAttention):
    """Overrides `_compute_attention` with Keras's signature before `use_causal_mask`."""

    def _compute_attention(
        self, query, key, value, attention_mask=None, training=None, return_attention_scores=False
    ):
        self.masks_seen.append(attention_mask)
        return super()._compute_attention(
            query, key, value, attention_mask, training, return_attention_scores
        )


def test_subclass_with_the_older_signature_still_gets_the_causal_mask(rng):
    keras_layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    layer = OlderSignature(num_heads=2, key_dim=4, implementation="reference")
    layer.masks_seen = []
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    build_and_copy(keras_layer, layer, x, x)
    layer.masks_seen.clear()
    actual = layer(x, x, use_causal_mask=True)
    (mask,) = layer.masks_seen
    np.testing.assert_array_equal(np.asarray(mask)[0], np.tril(np.ones((5, 5), bool)))
    tolerance("float32").check(actual, keras_layer(x, x, use_causal_mask=True))
