"""The compiled attention's variants (``AttentionVariant``): each one against numpy and
the reference, whichever the platform running the tests would pick for itself."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from attention_cases import SMALL_BLOCKS, make_case, to_tensors
from helpers import each_value, pairwise
from oracles import attention_oracle

from fastlayers.kernels import AttentionVariant, BlockSizes, Selection, attention, tolerance

# (native_operands, fused_softmax): the algorithms a variant combines with its tiles.
TILINGS = list(itertools.product((False, True), repeat=2))
CASES = ("causal", "padding", "bias", "gqa", "fully_masked")
# Keys in several blocks (logsumexp merges), or all in one (the fused softmax's whole
# rows: no merge, and the gradient recomputes the softmax).
BLOCKS = {"key_blocks": SMALL_BLOCKS, "whole_rows": BlockSizes(block_q=16, block_k=64)}


def _name(tiling):
    native, fused = tiling
    return f"native={native}-fused={fused}"


def _selection(tiling, blocks):
    native, fused = tiling
    variant = AttentionVariant(blocks.block_q, blocks.block_k, fused_softmax=fused, native_operands=native)
    return Selection("graph", variant)


def _compiled(tiling, blocks="key_blocks", **signature):
    def run(query, key, value, bias=None, mask=None, **options):
        return attention.dot_product_attention_compiled(
            query, key, value, bias, mask, scale=1.0 / np.sqrt(query.shape[-1]),
            selection=_selection(tiling, BLOCKS[blocks]), **options)

    return tf.function(run, autograph=False, **signature)


# Every pair of (tiling, dtype, case, blocks) values by default; the product with -m slow.
@pytest.mark.parametrize(
    "tiling, dtype, case, blocks", pairwise(TILINGS, ["float32", "bfloat16"], CASES, list(BLOCKS), ids=[_name, None, None, None])
)
def test_tiling_matches_numpy(rng, tiling, dtype, case, blocks):
    q, k, v, options = make_case(rng, case, dtype)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    out = _compiled(tiling, blocks)(**tensors, **kwargs)
    assert out.dtype == tf.as_dtype(dtype)
    expected = attention_oracle(q, k, v, **options)
    tolerance(dtype).check(out.numpy(), expected, what=f"{_name(tiling)} {dtype} {case}")
    if case == "fully_masked":
        np.testing.assert_array_equal(out.numpy()[:, ::5].astype(np.float64), 0.0)


@pytest.mark.parametrize("tiling", TILINGS, ids=_name)
def test_tiling_with_dynamic_lengths(rng, tiling):
    """Lengths unknown when traced: every key block may hold padding, and with no
    other mask only the last one is masked (a ``tf.cond`` per tile)."""
    spec = tf.TensorSpec([None, None, 4, 8], tf.float32)
    run = _compiled(tiling, input_signature=[spec, spec, spec])
    for t, s in ((37, 53), (16, 48), (5, 1)):
        q, k, v = (rng.standard_normal((2, length, 4, 8)) for length in (t, s, s))
        out = run(*(tf.constant(x, tf.float32) for x in (q, k, v)))
        tolerance("float32").check(out.numpy(), attention_oracle(q, k, v), what=f"T={t} S={s}")


@pytest.mark.parametrize(
    "tiling, dtype, case, blocks",
    pairwise(TILINGS, ["float32", "bfloat16"], ["causal", "bias", "fully_masked"], list(BLOCKS), ids=[_name, None, None, None]),
)
def test_tiling_gradients_match_reference(rng, tiling, dtype, case, blocks):
    q, k, v, options = make_case(rng, case, dtype, t=29, s=41)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    weights = tf.constant(rng.standard_normal((2, 29, 4, 8)), tf.float32)
    sources = {**tensors, **({"bias": kwargs.pop("bias")} if "bias" in kwargs else {})}

    def grads(run):
        with tf.GradientTape() as tape:
            tape.watch(list(sources.values()))
            loss = tf.reduce_sum(tf.cast(run(**sources, **kwargs), tf.float32) * weights)
        return tape.gradient(loss, list(sources.values()))

    def reference(query, key, value, bias=None, mask=None, **options):
        return attention.dot_product_attention_reference(
            query, key, value, bias, mask, scale=1.0 / np.sqrt(8), **options)

    for name, got, want in zip(sources, grads(_compiled(tiling, blocks)), grads(reference)):
        assert got.dtype == want.dtype
        tolerance(dtype, grad=True).check(got.numpy().astype(np.float64), want.numpy().astype(np.float64),
                                          what=f"d{name} {_name(tiling)}")


@pytest.mark.parametrize("tiling, blocks", each_value(TILINGS, list(BLOCKS), ids=[_name, None]))
def test_tiling_dropout_matches_reference(rng, tiling, blocks):
    q, k, v, _ = make_case(rng, "causal", "float32")
    tensors, _ = to_tensors("float32", q, k, v, {})
    options = {"is_causal": True, "dropout_rate": 0.3, "seed": tf.constant(7)}
    weights = tf.constant(rng.standard_normal(q.shape), tf.float32)

    def outputs_and_grads(run):
        with tf.GradientTape() as tape:
            tape.watch(list(tensors.values()))
            out = run(**tensors, **options)
            loss = tf.reduce_sum(out * weights)
        return [out, *tape.gradient(loss, list(tensors.values()))]

    def reference(query, key, value, **options):
        return attention.dot_product_attention_reference(query, key, value, scale=1.0 / np.sqrt(8), **options)

    got, want = outputs_and_grads(_compiled(tiling, blocks)), outputs_and_grads(reference)
    for name, a, b in zip(["out", "dquery", "dkey", "dvalue"], got, want):
        tolerance("float32", grad=name != "out").check(a.numpy(), b.numpy(), what=f"{name} {_name(tiling)}")


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("tiling", TILINGS, ids=_name)
def test_tiling_keeps_nan_rows_nan(rng, tiling, blocks):
    """A NaN query row gives NaN in that row only, as in the reference."""
    q = rng.standard_normal((1, 9, 2, 4))
    q[0, 4, 1] = np.nan
    k, v = rng.standard_normal((1, 11, 2, 4)), rng.standard_normal((1, 11, 2, 4))
    out = _compiled(tiling, blocks)(*(tf.constant(x, tf.float32) for x in (q, k, v))).numpy()
    assert np.isnan(out[0, 4, 1]).all()
    out[0, 4, 1] = 0.0
    assert np.isfinite(out).all()


def test_the_default_variant_picks_onednn_kernels_only_for_the_graph_path():
    def algorithm(implementation, platform, dtype):
        variant = attention.default_variant(implementation, platform, dtype)
        return variant.native_operands, variant.fused_softmax

    bf16, f32 = tf.bfloat16, tf.float32
    assert algorithm("xla", "cpu-onednn-bf16", bf16) == (False, False)
    assert algorithm("graph", "cpu", bf16) == (False, False)
    assert algorithm("graph", "cpu-onednn", bf16) == (False, True)
    assert algorithm("graph", "cpu-onednn-bf16", bf16) == (True, True)
    assert algorithm("graph", "cpu-onednn-bf16", f32) == (False, True)
    assert algorithm("graph", "gpu", tf.float16) == (True, False)


def test_explicit_block_sizes_fix_the_tiles_of_the_default_variant():
    variant = attention.default_variant("graph", "cpu-onednn", tf.float32, block_sizes=BlockSizes(8, 16))
    assert (variant.block_q, variant.block_k, variant.fused_softmax) == (8, 16, True)


@pytest.mark.parametrize("batch_heads, rows", [(None, 512), (8, 512), (32, 512), (64, 256), (96, 170), (4096, 16)])
def test_onednn_tiles_keep_their_size_as_batch_and_heads_grow(batch_heads, rows):
    assert attention.default_block_sizes(True, False, batch_heads) == BlockSizes(rows, 2048)
    # causal calls and the XLA path keep the small tiles
    assert attention.default_block_sizes(True, True, batch_heads) == attention.DEFAULT_BLOCK_SIZES
    assert attention.default_block_sizes(False, False, batch_heads) == attention.DEFAULT_BLOCK_SIZES


def test_the_tile_budget_is_configurable(monkeypatch):
    monkeypatch.setenv(attention.TILE_BUDGET_ENV, "64")
    assert attention.default_block_sizes(True, False, 32) == BlockSizes(256, 2048)
    monkeypatch.setenv(attention.TILE_BUDGET_ENV, "lots")
    assert attention.tile_budget_bytes() == attention.DEFAULT_TILE_BUDGET_BYTES


def test_many_batch_entries_and_heads_take_short_query_tiles(rng):
    """B·N = 256: the default oneDNN tile holds 64 query rows, so T=150 spans three
    query blocks, the last one partial, with every key in one block."""
    q, k, v = (rng.standard_normal((32, length, 8, 8)) for length in (150, 41, 41))
    blocks = attention.default_block_sizes(True, False, 32 * 8)
    assert blocks.block_q == 64
    fused = Selection("graph", AttentionVariant(blocks.block_q, blocks.block_k, fused_softmax=True))
    out = tf.function(lambda *x: attention.dot_product_attention_compiled(*x, scale=1.0 / np.sqrt(8), selection=fused))(
        *(tf.constant(x, tf.float32) for x in (q, k, v)))
    tolerance("float32").check(out.numpy(), attention_oracle(q, k, v), what="B·N=256")


def test_the_tuners_variants_fit_the_budget_and_differ_in_what_runs(monkeypatch):
    from fastlayers.kernels.attention import ATTENTION

    def variants(implementation, t, s, **options):
        shapes = ((4, t, 8, 64), (4, s, 8, 64), (4, s, 8, 64), None, None)
        return ATTENTION.variants(implementation, platform="cpu-onednn", dtype=tf.float32,
                                  shapes=shapes, scale=0.125, is_causal=False, dropout_rate=0.0,
                                  seed=None, **options)

    assert variants("reference", 64, 64) == (None,)
    # Every tile runs as 64x64; then whole rows keeping their probabilities.
    assert variants("xla", 64, 64) == (AttentionVariant(), AttentionVariant(64, 64, keep_probabilities=True))
    long = variants("graph", 2048, 2048)
    assert long[0] == attention.default_variant("graph", "cpu-onednn", tf.float32, batch_heads=32)
    assert {v.fused_softmax for v in long} == {True, False}
    assert any(v.block_k == 2048 for v in long)  # whole score rows
    assert all(4 * 32 * v.block_q * v.block_k <= attention.tile_budget_bytes() for v in long)
    monkeypatch.setenv(attention.TILE_BUDGET_ENV, "8")
    assert all(4 * 32 * v.block_q * v.block_k <= 8 * 2**20 for v in variants("xla", 2048, 2048))
    assert variants("graph", 2048, 2048, block_sizes=BlockSizes(8, 16)) == (
        AttentionVariant(8, 16, fused_softmax=True),
    )
