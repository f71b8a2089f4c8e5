"""Attention numerics: NaN in padding stays in the padding (kernels and layers, outputs
and gradients), and float16 scores beyond the dtype's range do not overflow the softmax."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import IMPLEMENTATIONS
from keras.src import backend as keras_backend
from oracles import attention_oracle

from fastlayers import kernels, layers
from fastlayers.kernels import BlockSizes, tolerance

# Tiles smaller than the test lengths, so padding spans several blocks and ends mid-block.
BLOCKS = BlockSizes(block_q=4, block_k=5)


def _poisoned(x, padded):
    """``x`` with NaN where ``padded`` ([B, L]) is True: the garbage padding may hold."""
    x = np.array(x, np.float32)
    x[padded] = np.nan
    return x


def _clean(x, padded):
    x = np.array(x, np.float32)
    x[padded] = 0.0
    return x


def _check_same(poisoned, clean, dtype, *, grad=False, what):
    poisoned, clean = np.asarray(poisoned, np.float64), np.asarray(clean, np.float64)
    assert np.isfinite(poisoned).all(), f"{what}: {np.isnan(poisoned).sum()} NaN of {poisoned.size}"
    tolerance(dtype, grad=grad).check(poisoned, clean, what=what)


def _outputs_and_gradients(run, inputs, weights):
    """``run(*inputs)`` and the gradients of ``Σ run(...)·weights`` w.r.t. ``inputs``."""
    inputs = [tf.constant(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = run(*inputs)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
    return out, tape.gradient(loss, inputs)


# --- NaN padding, kernels ---------------------------------------------------------------


def _attention_padding_case(rng, variant):
    """q, k, v and kernel options with sequences padded past ``lengths``.

    ``"keys"``: cross-attention, only the keys/values are padded (mask [B, 1, 1, S]).
    ``"self"``: causal self-attention, queries, keys and values padded alike
    (mask [B, 1, T, S], so a padded query row sees no key). The last sequence is
    all padding.
    """
    b, n, kv, h = 3, 4, 2, 8
    lengths = np.array([13, 6, 0])
    s = 13
    t = 9 if variant == "keys" else s
    keys_padded = np.arange(s)[None, :] >= lengths[:, None]  # [B, S]
    q = rng.standard_normal((b, t, n, h))
    k = rng.standard_normal((b, s, kv, h))
    v = rng.standard_normal((b, s, kv, h))
    bias = rng.standard_normal((1, n, t, s)).astype(np.float32)
    if variant == "keys":
        queries_padded = np.zeros((b, t), bool)
        mask = ~keys_padded[:, None, None, :]
        options = {"mask": mask}
    else:
        queries_padded = keys_padded
        mask = (~queries_padded)[:, None, :, None] & (~keys_padded)[:, None, None, :]
        options = {"mask": mask, "is_causal": True}
    return (q, k, v, bias), (queries_padded, keys_padded, keys_padded), options


@pytest.mark.parametrize("variant", ["keys", "self"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_padding_does_not_leak_from_dot_product_attention(rng, implementation, variant):
    (q, k, v, bias), padded, options = _attention_padding_case(rng, variant)
    mask = options.pop("mask")
    sees_nothing = ~np.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])).any(axis=-1)
    mask = tf.constant(mask)
    weights = tf.constant(rng.standard_normal((q.shape[0], q.shape[1], q.shape[2], v.shape[3])), tf.float32)

    def run(query, key, value, bias):
        return kernels.dot_product_attention(query, key, value, bias, mask, **options,
                                             block_sizes=BLOCKS, implementation=implementation)

    poisoned = [_poisoned(x, p) for x, p in zip((q, k, v), padded)] + [bias]
    clean = [_clean(x, p) for x, p in zip((q, k, v), padded)] + [bias]
    out, grads = _outputs_and_gradients(run, poisoned, weights)
    expected_out, expected_grads = _outputs_and_gradients(run, clean, weights)
    _check_same(out, expected_out, "float32", what="output")
    # Padded query rows see no key, nor does any row of the all-padding sequence: zeros.
    assert sees_nothing[2].all()
    np.testing.assert_array_equal(out.numpy().transpose(0, 2, 1, 3)[sees_nothing], 0.0)
    for name, got, want in zip(("dquery", "dkey", "dvalue", "dbias"), grads, expected_grads):
        _check_same(got, want, "float32", grad=True, what=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_key_only_mask_leaves_padded_queries_live(rng, implementation):
    """Self-attention masked by keys only ([B, 1, 1, S]): the padded query rows are
    real rows to the kernel, so their NaN reaches their own outputs and, through the
    key and value gradients they contribute to, every key's gradient (0·NaN), as in
    numpy. The unpadded outputs and query gradients stay clean. The fix is the mask
    Keras builds from a query mask: hide the padded rows too (see the "self" case)."""
    (q, k, v, bias), padded, _ = _attention_padding_case(rng, "self")
    queries_padded = padded[0]
    mask = tf.constant((~padded[1])[:, None, None, :])
    weights = np.where(queries_padded[:, :, None, None], 0.0, rng.standard_normal(q.shape[:3] + (v.shape[3],)))
    weights = tf.constant(weights, tf.float32)

    def run(query, key, value):
        return kernels.dot_product_attention(query, key, value, mask=mask, block_sizes=BLOCKS,
                                             implementation=implementation)

    poisoned = [_poisoned(x, p) for x, p in zip((q, k, v), padded)]
    clean = [_clean(x, p) for x, p in zip((q, k, v), padded)]
    out, (d_query, d_key, d_value) = _outputs_and_gradients(run, poisoned, weights)
    expected_out, (expected_d_query, _, _) = _outputs_and_gradients(run, clean, weights)
    live = ~queries_padded
    _check_same(out.numpy()[live], expected_out.numpy()[live], "float32", what="unpadded output")
    _check_same(d_query.numpy()[live], expected_d_query.numpy()[live], "float32", grad=True,
                what="unpadded dquery")
    # Sequence 1 has 6 real keys: its padded rows attend to them. Sequence 2 has none.
    assert np.isnan(out.numpy()[1, 6:]).all()
    assert np.isnan(d_key.numpy()[~padded[1]]).any() and np.isnan(d_value.numpy()[~padded[1]]).any()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_padding_does_not_leak_from_attention_pooling(rng, implementation):
    x = rng.standard_normal((4, 9, 5))
    padded = np.arange(9)[None, :] >= np.array([9, 5, 1, 0])[:, None]
    weight = rng.standard_normal((5, 1)).astype(np.float32)
    bias = rng.standard_normal((9, 1)).astype(np.float32)
    mask = tf.constant(~padded)

    def run(x, weight, bias):
        return kernels.attention_pooling(x, weight, bias, mask, implementation=implementation)

    weights = tf.constant(rng.standard_normal((4, 5)), tf.float32)
    out, grads = _outputs_and_gradients(run, [_poisoned(x, padded), weight, bias], weights)
    expected_out, expected_grads = _outputs_and_gradients(run, [_clean(x, padded), weight, bias], weights)
    _check_same(out, expected_out, "float32", what="output")
    np.testing.assert_array_equal(out.numpy()[3], 0.0)
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, expected_grads):
        _check_same(got, want, "float32", grad=True, what=name)


# --- NaN padding, layers ----------------------------------------------------------------


def _layer_outputs_and_gradients(layer, call, inputs, weights):
    """Outputs and the gradients w.r.t. the (unpadded and padded) inputs only.

    Weight gradients are left out: a projection's kernel gradient sums ``x·dY`` over
    every position, NaN padding included, in Keras's own layers too.
    """
    inputs = [tf.constant(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = call(layer, *inputs)
        loss = tf.reduce_sum(out * weights)
    return out, tape.gradient(loss, inputs)


@pytest.mark.parametrize("mask_source", ["keras_mask", "attention_mask"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_padding_does_not_leak_from_multi_head_attention(rng, implementation, mask_source):
    layer = layers.MultiHeadAttention(num_heads=2, key_dim=4, implementation=implementation)
    lengths = np.array([7, 3, 0])
    padded = np.arange(7)[None, :] >= lengths[:, None]
    valid = tf.constant(~padded)
    if mask_source == "keras_mask":
        # Self-attention over padded sequences carrying the Keras mask that
        # Embedding(mask_zero=True) attaches: padded queries and keys alike.
        x = rng.standard_normal((3, 7, 8))
        inputs, pads = [x], [padded]

        def call(layer, x):
            keras_backend.set_keras_mask(x, valid)
            return layer(x, x)
    else:
        # Cross-attention from clean queries to padded values, masked by attention_mask.
        query, value = rng.standard_normal((3, 5, 8)), rng.standard_normal((3, 7, 6))
        inputs, pads = [query, value], [np.zeros((3, 5), bool), padded]
        attention_mask = tf.constant(np.broadcast_to(~padded[:, None, :], (3, 5, 7)))

        def call(layer, query, value):
            return layer(query, value, attention_mask=attention_mask)

    weights = tf.constant(rng.standard_normal((3, inputs[0].shape[1], 8)), tf.float32)
    out, grads = _layer_outputs_and_gradients(layer, call, [_poisoned(x, p) for x, p in zip(inputs, pads)],
                                              weights)
    expected_out, expected_grads = _layer_outputs_and_gradients(
        layer, call, [_clean(x, p) for x, p in zip(inputs, pads)], weights)
    _check_same(out, expected_out, "float32", what="output")
    for i, (got, want) in enumerate(zip(grads, expected_grads)):
        _check_same(got, want, "float32", grad=True, what=f"dinput[{i}]")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_padding_does_not_leak_from_attention_pooling_layer(rng, implementation):
    layer = layers.AttentionPooling(implementation=implementation)
    x = rng.standard_normal((3, 6, 4))
    padded = np.arange(6)[None, :] >= np.array([6, 2, 0])[:, None]
    mask = tf.constant(~padded)
    weights = tf.constant(rng.standard_normal((3, 4)), tf.float32)

    def outputs_and_gradients(x):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, mask=mask)
            loss = tf.reduce_sum(out * weights)
        return out, tape.gradient(loss, [x, *layer.trainable_weights])

    out, grads = outputs_and_gradients(_poisoned(x, padded))
    expected_out, expected_grads = outputs_and_gradients(_clean(x, padded))
    _check_same(out, expected_out, "float32", what="output")
    # No projection before the pooling: the weight gradients stay clean too.
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, expected_grads):
        _check_same(got, want, "float32", grad=True, what=name)


# --- float16 scores beyond 65504 --------------------------------------------------------


def _huge_scores_case(rng, kind):
    """float16 inputs whose scores ``Q·Kᵀ·scale`` exceed float16's max (65504).

    ``"beyond_range"``: the first feature of every query is an integer in [400, 1000]
    and of every key 400, the others multiples of 1/4 in [-2, 2], so the scores are
    80000-200000 yet differ by a few units between keys (a softmax that is not one
    hot), and every score is exact in float32 (dyadic, under 2^24): all paths see
    the same numbers. ``"at_limit"``: first features of ±60000 (float16's max is
    65504) and no other key feature, so every score of a row is the same ±1.8e9
    (exact in float32 too) and the softmax is uniform.
    """
    b, t, s, n, h = 2, 6, 9, 2, 4  # scale = 1/sqrt(4) = 0.5, exact
    quarters = lambda shape: rng.integers(-8, 9, shape) / 4  # noqa: E731
    q, k = quarters((b, t, n, h)), quarters((b, s, 1, h))
    if kind == "beyond_range":
        q[..., 0] = rng.integers(400, 1001, (b, t, n))
        k[..., 0] = 400
    else:
        q[..., 0] = rng.choice([-60000.0, 60000.0], (b, t, n))
        k[..., 0], k[..., 1:] = 60000, 0
    v = rng.standard_normal((b, s, 1, h)).astype(np.float16).astype(np.float64)
    assert np.abs(np.einsum("btnh,bsh->bnts", q, k[:, :, 0]) * 0.5).max() > 65504
    return q, k, v


@pytest.mark.parametrize("options", ["plain", "masked"])
@pytest.mark.parametrize("kind", ["beyond_range", "at_limit"])
def test_float16_scores_beyond_the_dtype_do_not_overflow(rng, kind, options):
    q, k, v = _huge_scores_case(rng, kind)
    kwargs = {}
    if options == "masked":
        lengths = np.array([9, 4])
        kwargs = {
            "is_causal": True,
            "mask": tf.constant((np.arange(9)[None, :] < lengths[:, None])[:, None, None]),
            # A per-row shift near the limit too: it leaves the softmax unchanged.
            "bias": rng.choice([-60000.0, 60000.0], (1, 2, 6, 1)),
        }

    def run(dtype, implementation):
        call = {key: tf.constant(value, dtype) if key == "bias" else value for key, value in kwargs.items()}
        return kernels.dot_product_attention(*(tf.constant(x, dtype) for x in (q, k, v)), **call,
                                             implementation=implementation)

    expected = run(tf.float32, "reference").numpy()
    oracle_kwargs = {key: np.asarray(value) if key == "mask" else value for key, value in kwargs.items()}
    tolerance("float32").check(expected, attention_oracle(q, k, v, **oracle_kwargs), what="float32 vs numpy")
    for implementation in IMPLEMENTATIONS:
        out = run(tf.float16, implementation).numpy()
        assert np.isfinite(out).all(), implementation
        tolerance("float16").check(out, expected, what=f"{kind} {options} {implementation}")
