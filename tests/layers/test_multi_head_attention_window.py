"""layers.MultiHeadAttention with Keras's sliding_window (the kernel's window, not a
band mask) and its input checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fastlayers import kernels, layers
from fastlayers.kernels import tolerance


def twins(implementation="graph", **config):
    config = dict(num_heads=2, key_dim=4, **config)
    theirs = keras.layers.MultiHeadAttention(**config)
    ours = layers.MultiHeadAttention(**config, implementation=implementation)
    build = np.ones((2, 11, 6), np.float32), np.ones((2, 11, 5), np.float32)
    theirs(*build)
    ours(*build)
    ours.set_weights(theirs.get_weights())
    return theirs, ours


@pytest.mark.parametrize("window, causal", [(3, False), (3, True), (1, True), (20, False)])
def test_window_matches_keras(rng, window, causal):
    theirs, ours = twins(sliding_window=window)
    query = rng.standard_normal((2, 11, 6)).astype(np.float32)
    value = rng.standard_normal((2, 11, 5)).astype(np.float32)
    mask = rng.random((2, 11, 11)) > 0.4
    mask[:, np.arange(11), np.arange(11)] = True  # no row fully masked
    for kwargs in ({}, {"attention_mask": mask}):
        expected = theirs(query, value, use_causal_mask=causal, **kwargs)
        actual = ours(query, value, use_causal_mask=causal, **kwargs)
        tolerance("float32").check(np.asarray(actual), np.asarray(expected))
    expected, expected_scores = theirs(query, value, use_causal_mask=causal, return_attention_scores=True)
    actual, scores = ours(query, value, use_causal_mask=causal, return_attention_scores=True)
    tolerance("float32").check(np.asarray(actual), np.asarray(expected))
    tolerance("float32").check(np.asarray(scores), np.asarray(expected_scores))


def test_the_kernel_takes_the_window_and_no_band_mask(rng, monkeypatch):
    seen = []
    real = kernels.dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((kwargs["sliding_window"], kwargs["is_causal"], kwargs["mask"]))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(kernels, "dot_product_attention", spy)
    _, ours = twins(sliding_window=3)
    x = rng.standard_normal((2, 11, 6)).astype(np.float32)
    ours(x, rng.standard_normal((2, 11, 5)), use_causal_mask=True)
    assert seen[-1] == (3, True, None)


def test_bad_inputs_name_the_shapes(rng):
    _, ours = twins()
    query = rng.standard_normal((2, 11, 6)).astype(np.float32)
    value = rng.standard_normal((2, 11, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"must have the same rank.*query.shape=\(2, 11, 6\), value.shape=\(2, 11\)"):
        ours(query, value[..., 0])
    with pytest.raises(ValueError, match=r"last axis of `query` .* must be 6.*query.shape=\(2, 11, 4\)"):
        ours(query[..., :4], value)
    with pytest.raises(ValueError, match=r"last axis of `key` .* must be 5.*key.shape=\(2, 11, 3\)"):
        ours(query, value, key=value[..., :3])


def test_empty_sequences_with_a_window(rng):
    theirs, ours = twins(sliding_window=2)
    for q_len, v_len in ((0, 5), (4, 0)):
        query = tf.constant(rng.standard_normal((2, q_len, 6)), tf.float32)
        value = tf.constant(rng.standard_normal((2, v_len, 5)), tf.float32)
        expected = theirs(query, value, use_causal_mask=True)
        actual = ours(query, value, use_causal_mask=True)
        assert actual.shape == expected.shape
        tolerance("float32").check(np.asarray(actual), np.asarray(expected))
