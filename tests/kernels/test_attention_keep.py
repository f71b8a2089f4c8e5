"""The compiled attention's variant that keeps the probabilities for its backward
(``AttentionVariant.keep_probabilities``): the same outputs and gradients as the
recomputing variant, within the keep budget only, and auto's choice in training."""

import numpy as np
import pytest
import tensorflow as tf
from attention_cases import make_case, to_tensors

from fastlayers.kernels import AttentionVariant, Selection, attention, tolerance

# Whole rows (every key in one block of 53), queries in 16-row blocks: 3 blocks, the
# last one padded.
KEEP = AttentionVariant(16, 53, keep_probabilities=True)
RECOMPUTE = AttentionVariant(16, 24)


def _compiled(variant, implementation="graph"):
    def run(query, key, value, bias=None, mask=None, **options):
        return attention.dot_product_attention_compiled(
            query, key, value, bias, mask, scale=1.0 / np.sqrt(query.shape[-1]),
            selection=Selection(implementation, variant), **options)

    return tf.function(run, autograph=False, jit_compile=implementation == "xla")


def _outputs_and_grads(run, tensors, kwargs, weights):
    sources = {**tensors, **({"bias": kwargs.pop("bias")} if "bias" in kwargs else {})}
    with tf.GradientTape() as tape:
        tape.watch(list(sources.values()))
        out = run(**sources, **kwargs)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
    return {"out": out, **dict(zip(sources, tape.gradient(loss, list(sources.values()))))}


def _check_same(rng, dtype, case, implementation="graph", **extra):
    q, k, v, options = make_case(rng, case, dtype)
    options.update(extra)
    weights = tf.constant(rng.standard_normal((2, 37, 4, 8)), tf.float32)
    got = _outputs_and_grads(_compiled(KEEP, implementation), *to_tensors(dtype, q, k, v, options), weights)
    want = _outputs_and_grads(_compiled(RECOMPUTE, implementation), *to_tensors(dtype, q, k, v, options), weights)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        tolerance(dtype, grad=name != "out").check(
            got[name].numpy().astype(np.float64), want[name].numpy().astype(np.float64),
            what=f"{name} {case} {dtype} {implementation}")
    return got


@pytest.mark.parametrize("case", ["plain", "causal", "padding", "bias", "gqa", "fully_masked"])
def test_keep_matches_recomputing_gradients(rng, case):
    got = _check_same(rng, "float32", case)
    if case == "fully_masked":
        np.testing.assert_array_equal(got["out"].numpy()[:, ::5], 0.0)
        np.testing.assert_array_equal(got["query"].numpy()[:, ::5], 0.0)


def test_keep_matches_recomputing_with_dropout_and_window(rng):
    """Dropout drops the same positions in the kept and recomputed backward."""
    _check_same(rng, "float32", "causal", dropout_rate=0.3, seed=tf.constant(7))
    _check_same(rng, "float32", "plain", sliding_window=9)


def test_keep_matches_recomputing_in_bfloat16(rng):
    _check_same(rng, "bfloat16", "bias")


def test_keep_matches_recomputing_under_xla(rng):
    _check_same(rng, "float32", "gqa", implementation="xla")


def _plan(variant, b=2, t=37, s=53, n=4):
    q = tf.zeros((b, t, n, 8))
    k = v = tf.zeros((b, s, n, 8))
    return attention._Plan(q, k, v, None, None, 1.0, False, None, 0.0, None, variant.block_sizes, variant)


def test_keep_budget_from_environment(monkeypatch):
    monkeypatch.delenv(attention.KEEP_BUDGET_ENV, raising=False)
    assert attention.keep_budget_bytes() == attention.DEFAULT_KEEP_BUDGET_BYTES == 128 * 2**20
    monkeypatch.setenv(attention.KEEP_BUDGET_ENV, "0.5")
    assert attention.keep_budget_bytes() == 2**19
    for bad in ("", "lots", "-3", "0"):
        monkeypatch.setenv(attention.KEEP_BUDGET_ENV, bad)
        assert attention.keep_budget_bytes() == attention.DEFAULT_KEEP_BUDGET_BYTES


def test_a_call_over_the_keep_budget_recomputes(rng, monkeypatch):
    # 2·4·48·53 float32 probabilities (T padded to whole blocks): 81,408 bytes.
    assert attention.kept_bytes(2, 4, 48, 53) == 81408
    monkeypatch.setenv(attention.KEEP_BUDGET_ENV, str(81408 / 2**20))
    assert _plan(KEEP).keep
    monkeypatch.setenv(attention.KEEP_BUDGET_ENV, str(81404 / 2**20))
    assert not _plan(KEEP).keep
    assert _plan(KEEP).whole_rows  # whole rows still, recomputed from q and k
    # And over the budget it still computes the same gradients.
    _check_same(rng, "float32", "causal")


def test_keep_needs_whole_rows_and_static_sizes():
    assert not _plan(AttentionVariant(16, 24, keep_probabilities=True)).keep  # S in 3 key blocks
    assert not _plan(RECOMPUTE).keep
    spec = tf.TensorSpec([None, 37, 4, 8], tf.float32)

    @tf.function(input_signature=[spec])
    def plan_keeps(q):  # B unknown when traced: the budget cannot be checked
        k = tf.zeros((2, 53, 4, 8))
        plan = attention._Plan(q, k, k, None, None, 1.0, False, None, 0.0, None, KEEP.block_sizes, KEEP)
        return tf.constant(plan.keep)

    assert not plan_keeps(tf.zeros((2, 37, 4, 8))).numpy()


def _default(shapes, recording, **options):
    def choose():
        return attention._default_variant(
            "xla", platform="cpu", dtype=tf.float32, shapes=shapes, **options)

    if not recording:
        return choose()
    with tf.GradientTape():
        return choose()


def test_auto_keeps_probabilities_in_training_where_they_fit(monkeypatch):
    monkeypatch.delenv(attention.KEEP_BUDGET_ENV, raising=False)
    shapes = ((16, 256, 4, 64), (16, 256, 4, 64), (16, 256, 4, 64), None, None)
    assert _default(shapes, recording=True) == AttentionVariant(256, 256, keep_probabilities=True)
    assert _default(shapes, recording=True, is_causal=True).keep_probabilities  # one query block
    assert not _default(shapes, recording=False).keep_probabilities  # inference keeps nothing
    assert not _default(shapes, recording=True, sliding_window=32).keep_probabilities
    long = ((4, 1024, 8, 64), (4, 1024, 8, 64), (4, 1024, 8, 64), None, None)
    # Causal over several query blocks: small tiles skip the blocks above the diagonal.
    assert not _default(long, recording=True, is_causal=True).keep_probabilities
    assert _default(long, recording=True) == AttentionVariant(256, 1024, keep_probabilities=True)
    monkeypatch.setenv(attention.KEEP_BUDGET_ENV, "64")  # 128 MiB would be needed
    assert _default(long, recording=True) == AttentionVariant()
    unknown = ((None, 256, 4, 64), (None, 256, 4, 64), (None, 256, 4, 64), None, None)
    assert not _default(unknown, recording=True).keep_probabilities


def test_tuner_candidates_include_kept_variants_within_budget(monkeypatch):
    monkeypatch.delenv(attention.KEEP_BUDGET_ENV, raising=False)
    shapes = ((4, 512, 8, 64), (4, 512, 8, 64), (4, 512, 8, 64), None, None)
    found = attention._variants("xla", platform="cpu", dtype=tf.float32, shapes=shapes, is_causal=True)
    kept = [v for v in found if v.keep_probabilities]
    assert [(v.block_q, v.block_k) for v in kept] == [(256, 512), (512, 512)]
    assert all(v.label.endswith(" keep") for v in kept)
    monkeypatch.setenv(attention.KEEP_BUDGET_ENV, "1")
    found = attention._variants("xla", platform="cpu", dtype=tf.float32, shapes=shapes, is_causal=True)
    assert not any(v.keep_probabilities for v in found)
