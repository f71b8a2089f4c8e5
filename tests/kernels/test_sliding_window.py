"""kernels.dot_product_attention(sliding_window=w): Keras's band |t - s| < w, against the
reference given the same band as an explicit mask, in every implementation, with
gradients, and the compiled paths' block skipping."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import IMPLEMENTATIONS
from oracles import attention_oracle

from fastlayers import kernels
from fastlayers.kernels import BlockSizes, tolerance
from fastlayers.kernels import attention as attention_module

# Small tiles: the band spans several key blocks and leaves whole blocks outside it.
BLOCKS = BlockSizes(block_q=4, block_k=5)


def band(t, s, window, is_causal=False):
    """Keras's ``_compute_sliding_window_mask`` (and causal mask), as numpy ``[t, s]``."""
    rows, cols = np.arange(t)[:, None], np.arange(s)[None, :]
    keep = np.abs(rows - cols) < window
    return keep & (rows >= cols) if is_causal else keep


CASES = {
    # name: (T, S, N, K, window, causal, padding)
    "symmetric": (23, 23, 4, 4, 5, False, False),
    "causal": (23, 23, 4, 4, 5, True, False),
    "w=1": (17, 17, 2, 2, 1, False, False),
    "w=1 causal": (17, 17, 2, 2, 1, True, False),
    "w>=T": (13, 13, 2, 2, 40, False, False),
    "w>=T causal": (13, 13, 2, 2, 13, True, False),
    "gqa": (19, 26, 4, 2, 6, False, False),
    "gqa causal": (26, 19, 4, 1, 3, True, False),
    "padding": (21, 21, 2, 2, 4, False, True),
    "padding causal": (21, 21, 4, 2, 7, True, True),
}


def make(rng, t, s, n, kv, padding, h=8):
    q = rng.standard_normal((2, t, n, h)).astype(np.float32)
    k = rng.standard_normal((2, s, kv, h)).astype(np.float32)
    v = rng.standard_normal((2, s, kv, h)).astype(np.float32)
    mask = None
    if padding:
        lengths = np.array([s, max(1, s // 2)])
        mask = (np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, mask


# XLA compiles a program per case: its full sweep runs under -m slow.
QUICK_XLA = ("causal", "gqa", "padding causal", "w=1", "w>=T")
SWEEP = [
    pytest.param(implementation, name, marks=[pytest.mark.slow] if implementation == "xla" and name not in QUICK_XLA else [])
    for implementation in IMPLEMENTATIONS
    for name in CASES
]


@pytest.mark.parametrize("implementation, name", SWEEP)
def test_window_matches_an_explicit_band_mask(rng, implementation, name):
    t, s, n, kv, window, causal, padding = CASES[name]
    q, k, v, mask = make(rng, t, s, n, kv, padding)
    banded = band(t, s, window, causal)[None, None]
    full_mask = banded if mask is None else banded & mask
    expected = attention_oracle(q, k, v, mask=full_mask)
    explicit = kernels.dot_product_attention(q, k, v, mask=full_mask, implementation="reference")
    tolerance("float32").check(explicit.numpy(), expected, what="reference with a band mask vs numpy")
    out = kernels.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, sliding_window=window,
        block_sizes=BLOCKS, implementation=implementation,
    )
    tolerance("float32").check(out.numpy(), expected, what=f"{implementation} {name}")


def _loss_and_grads(implementation, q, k, v, weights, **options):
    q, k, v = (tf.constant(a) for a in (q, k, v))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = kernels.dot_product_attention(q, k, v, implementation=implementation, **options)
        loss = tf.reduce_sum(out * weights)
    return out, tape.gradient(loss, [q, k, v])


@pytest.mark.parametrize("implementation, name", [
    ("graph", "causal"), ("graph", "gqa"), ("xla", "padding causal"), ("graph", "w=1"),
    *(pytest.param("xla", name, marks=pytest.mark.slow) for name in ("causal", "gqa", "w=1")),
])
def test_window_gradients_match_the_band_masked_reference(rng, implementation, name):
    t, s, n, kv, window, causal, padding = CASES[name]
    q, k, v, mask = make(rng, t, s, n, kv, padding)
    weights = tf.constant(rng.standard_normal((2, t, n, 8)), tf.float32)
    banded = band(t, s, window, causal)[None, None]
    full_mask = banded if mask is None else banded & mask
    expected, expected_grads = _loss_and_grads("reference", q, k, v, weights, mask=full_mask)
    out, grads = _loss_and_grads(
        implementation, q, k, v, weights, mask=mask, is_causal=causal, sliding_window=window,
        block_sizes=BLOCKS,
    )
    tolerance("float32").check(out.numpy(), expected.numpy(), what="output")
    for name_, actual, wanted in zip("qkv", grads, expected_grads, strict=True):
        tolerance("float32", grad=True).check(actual.numpy(), wanted.numpy(), what=f"d{name_}")


def test_window_with_dropout_matches_the_reference(rng):
    q, k, v, _ = make(rng, 22, 22, 2, 1, False)
    options = dict(sliding_window=4, is_causal=True, dropout_rate=0.4, seed=7, block_sizes=BLOCKS)
    reference = kernels.dot_product_attention(q, k, v, implementation="reference", **options)
    for implementation in ("graph", "xla"):
        out = kernels.dot_product_attention(q, k, v, implementation=implementation, **options)
        tolerance("float32").check(out.numpy(), reference.numpy(), what=implementation)


@pytest.mark.parametrize("is_causal", [False, True])
def test_compiled_paths_visit_only_the_blocks_in_the_band(is_causal):
    """The block ranges the loops walk: every block holding an allowed score is
    visited, and none wholly outside the band (so work grows with T·w, not T·S)."""
    t, s, window = 64, 64, 9
    q = tf.zeros([1, t, 1, 4])
    k = tf.zeros([1, s, 1, 4])
    plan = attention_module._Plan(q, k, k, None, None, 1.0, is_causal, window, 0.0, None,
                                  BLOCKS, attention_module.AttentionVariant())
    allowed = band(t, s, window, is_causal)
    visited = 0
    for i in range(plan.num_q):
        first, end = int(plan.first_key_block_for(i)), int(plan.key_blocks_for(i))
        rows = allowed[i * BLOCKS.block_q:(i + 1) * BLOCKS.block_q]
        needed = {j for j in range(plan.num_k) if rows[:, j * BLOCKS.block_k:(j + 1) * BLOCKS.block_k].any()}
        assert needed == set(range(first, end)), i
        visited += end - first
        for j in range(first, end):
            assert int(plan.first_query_block_for(j)) <= i < int(plan.query_blocks_for(j))
    for j in range(plan.num_k):
        columns = allowed[:, j * BLOCKS.block_k:(j + 1) * BLOCKS.block_k]
        needed = {i for i in range(plan.num_q) if columns[i * BLOCKS.block_q:(i + 1) * BLOCKS.block_q].any()}
        assert needed == set(range(int(plan.first_query_block_for(j)), int(plan.query_blocks_for(j)))), j
    assert visited < plan.num_q * plan.num_k / 2


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "4"])
def test_invalid_window(window):
    x = tf.zeros([1, 3, 1, 4])
    with pytest.raises(ValueError, match=r"Received an invalid value for `sliding_window`, expected "
                                         r"None or a positive integer. Received: sliding_window="):
        kernels.dot_product_attention(x, x, x, sliding_window=window)


def test_numpy_integer_window_is_taken():
    x = tf.random.stateless_normal([1, 6, 1, 4], seed=[1, 2])
    out = kernels.dot_product_attention(x, x, x, sliding_window=np.int64(2), implementation="graph")
    expected = kernels.dot_product_attention(x, x, x, mask=band(6, 6, 2), implementation="reference")
    tolerance("float32").check(out.numpy(), expected.numpy())
