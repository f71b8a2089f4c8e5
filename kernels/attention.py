"""Scaled dot-product attention whose memory grows linearly with the sequence.

``softmax(Q·Kᵀ·scale + bias, masked) · V`` with grouped-query heads, a causal option,
a sliding window (Keras's band ``|t - s| < w``) and dropout on the attention
probabilities. Zero-sized axes take what the reference gives: no query rows (T=0)
give no output rows, no keys (S=0) rows that see no key (zeros), B=0 an empty batch.

Shape letters: ``B`` batch, ``T`` query length, ``S`` key length, ``N`` query heads,
``K`` key/value heads (``K`` divides ``N``), ``G = N / K`` query heads per key/value
head, ``H`` query/key head dim, ``D`` value head dim. ``query [B, T, N, H]``,
``key [B, S, K, H]``, ``value [B, S, K, D]``, output ``[B, T, N, D]``; masks and biases
broadcast to ``[B, N, T, S]``. Query head ``n`` attends with key/value head
``n // G``, as in ``keras.ops.dot_product_attention``.

The reference builds the whole ``[B, N, T, S]`` score tensor. The compiled algorithm
walks query blocks × key blocks with an online softmax (a running max and a running
sum per query row, in float32), so no ``T·S`` tensor is ever held whole; causal blocks
above the diagonal, and blocks wholly outside a sliding window's band, are never
computed. With T or S zero it walks one block of padding, so its loops keep one shape. Its gradient (``tf.custom_gradient``) recomputes
the blocks from the saved per-row logsumexp, so the backward pass is linear in ``T``
too, unless the variant keeps the probabilities (``keep_probabilities``: whole score
rows, kept from the forward for the backward, as Keras's layer does) and they fit
``keep_budget_bytes()``. Where TensorFlow runs on oneDNN, the graph path instead softmaxes each tile with
oneDNN's one-pass kernel and merges tiles by logsumexp, or, when every key fits in one
tile, takes each row's whole softmax at once (``AttentionVariant``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os

import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels import platform as platform_lib
from fastlayers.kernels.auto import AUTO
from fastlayers.kernels.native import attention as native_attention
from fastlayers.kernels.validation import check_floating, check_same_dtype
from fastlayers.kernels.precision import (
    accumulation_dtype,
    mask_value,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the compiled algorithm.

    The score tile held at once is ``[B, N, block_q, block_k]`` (float32), so memory
    is bounded by these two numbers whatever ``T`` and ``S`` are. Sequences shorter
    than a block use one block of their own length; longer ones are padded to a
    multiple of the block with masked positions.

    ``block_sizes=None`` lets dispatch choose: this machine's tuned tiles
    (``fastlayers tune``) where it has them, else 256x256, or on the graph path on
    oneDNN without a causal mask 512x2048 (fewer query rows beyond B·N = 32, so the
    tile stays within ``TILE_BUDGET_BYTES``). Why: small tiles stay in the
    last-level cache between the element-wise passes and, under a causal mask,
    skip more work above the diagonal; oneDNN's kernels run fewer, bigger ops best,
    and with every key in one tile a tile's softmax is its rows' whole softmax
    (oneDNN's one-pass kernel, no logsumexp to merge, in bfloat16 no casts).

    Args:
        block_q: positive integer, query rows per tile.
        block_k: positive integer, key columns per tile.
    """

    block_q: int = 256
    block_k: int = 256

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(
                    f"Received an invalid value for `{name}`, expected a positive integer. "
                    f"Received: {name}={value!r}"
                )

    @property
    def label(self) -> str:
        """``"64x512"``: how bench and the tuner name the tiles (the native variant)."""
        return f"{self.block_q}x{self.block_k}"


DEFAULT_BLOCK_SIZES = BlockSizes()
ONEDNN_BLOCK_SIZES = BlockSizes(block_q=512, block_k=2048)
TILE_BUDGET_ENV = "FASTLAYERS_ATTENTION_TILE_MIB"
# The float32 score tile auto and the tuner allow by default: the oneDNN tile at
# B·N = 32 (512x2048), 128 MiB. With more batch entries and heads, fewer query rows
# per tile keep it there; the tuner's wider candidates (whole score rows) must fit.
DEFAULT_TILE_BUDGET_BYTES = 32 * ONEDNN_BLOCK_SIZES.block_q * ONEDNN_BLOCK_SIZES.block_k * 4


KEEP_BUDGET_ENV = "FASTLAYERS_ATTENTION_KEEP_MIB"
# The probabilities one call may keep from its forward for its backward (float32,
# ``B·N·T·S·4`` bytes): as much as the score tile may hold.
DEFAULT_KEEP_BUDGET_BYTES = DEFAULT_TILE_BUDGET_BYTES


def _budget_from_env(name, default):
    try:
        mib = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return int(mib * 2**20) if mib > 0 else default


def tile_budget_bytes() -> int:
    """The score tile's memory budget: ``FASTLAYERS_ATTENTION_TILE_MIB`` MiB if set
    (a positive number), else ``DEFAULT_TILE_BUDGET_BYTES``."""
    return _budget_from_env(TILE_BUDGET_ENV, DEFAULT_TILE_BUDGET_BYTES)


def keep_budget_bytes() -> int:
    """The memory a call may spend keeping its probabilities for the backward
    (``AttentionVariant.keep_probabilities``): ``FASTLAYERS_ATTENTION_KEEP_MIB`` MiB
    if set (a positive number), else ``DEFAULT_KEEP_BUDGET_BYTES`` (128 MiB). The
    probabilities of a call take ``B·N·T·S·4`` bytes (T and S padded to whole
    blocks); a call over the budget recomputes them, in memory linear in T and S."""
    return _budget_from_env(KEEP_BUDGET_ENV, DEFAULT_KEEP_BUDGET_BYTES)


def kept_bytes(batch, heads, t_len, s_len) -> int:
    """The bytes of the float32 probabilities ``[B, N, T, S]`` a call would keep."""
    return 4 * batch * heads * t_len * s_len


def fits_keep_budget(batch, heads, t_len, s_len) -> bool:
    """Whether a call with these static sizes may keep its probabilities (False
    when any is unknown: the budget cannot be checked)."""
    if None in (batch, heads, t_len, s_len):
        return False
    return kept_bytes(batch, heads, t_len, s_len) <= keep_budget_bytes()


@dataclasses.dataclass(frozen=True)
class AttentionVariant:
    """How the compiled algorithm computes a call: its tiles and its algorithm.

    Attributes:
        block_q: query rows per tile.
        block_k: key columns per tile; at least ``S`` with ``fused_softmax`` takes
            every row's whole softmax at once ("whole rows").
        fused_softmax: each score tile goes through one ``tf.nn.softmax`` (oneDNN's
            single-pass kernel) and tiles are merged by their logsumexp, instead of
            the separate max / exp / sum ops of the online softmax.
        native_operands: matmul operands stay in the input's half-precision dtype
            (where the platform's products accumulate in float32 natively) instead
            of being cast to float32.
        keep_probabilities: with every key in one block (``block_k`` at least
            ``S``), take each row's whole softmax at once and keep the
            probabilities from the forward for the backward, which then uses them
            instead of recomputing the scores (one product and the softmax fewer per
            tile, as Keras's layer). Only where they fit ``keep_budget_bytes()``
            with static sizes; otherwise the call runs as without the flag.
    """

    block_q: int = DEFAULT_BLOCK_SIZES.block_q
    block_k: int = DEFAULT_BLOCK_SIZES.block_k
    fused_softmax: bool = False
    native_operands: bool = False
    keep_probabilities: bool = False

    @property
    def label(self) -> str:
        algorithm = " fused" if self.fused_softmax else ""
        kept = " keep" if self.keep_probabilities else ""
        return f"{self.block_q}x{self.block_k}{algorithm}{' native' if self.native_operands else ''}{kept}"

    @property
    def block_sizes(self) -> BlockSizes:
        return BlockSizes(self.block_q, self.block_k)


def default_block_sizes(fused_softmax, is_causal, batch_heads=None) -> BlockSizes:
    """Wide tiles for oneDNN's kernels (``fused_softmax``), which run fewer, bigger
    ops best, except under a causal mask, where small tiles skip more work above the
    diagonal. ``batch_heads``: B·N where known; query rows shrink (to 16 at least)
    so that the tile stays within ``tile_budget_bytes()``."""
    if not fused_softmax or is_causal:
        return DEFAULT_BLOCK_SIZES
    if not batch_heads:
        return ONEDNN_BLOCK_SIZES
    rows = tile_budget_bytes() // (4 * batch_heads * ONEDNN_BLOCK_SIZES.block_k)
    return BlockSizes(max(16, min(ONEDNN_BLOCK_SIZES.block_q, rows)), ONEDNN_BLOCK_SIZES.block_k)


def default_variant(implementation, platform, dtype, *, is_causal=False, batch_heads=None, block_sizes=None):
    """The variant auto takes from the table: the graph path takes oneDNN's kernels
    where TensorFlow uses oneDNN; XLA compiles its own dots and fuses the
    element-wise ops. ``block_sizes`` (the caller's) fixes the tiles."""
    graph = implementation == "graph"
    fused = graph and platform.startswith("cpu-onednn")
    native = graph and dispatch.native_low_precision_matmul(platform, dtype)
    blocks = block_sizes or default_block_sizes(fused, is_causal, batch_heads)
    return AttentionVariant(blocks.block_q, blocks.block_k, fused, native)


# Tile sizes the tuner tries besides the default (block_k is capped at S): small
# square tiles, and wide ones for matmul libraries that prefer fewer, bigger ops.
TUNED_BLOCK_SIZES = ((256, 256), (128, 256), (256, 1024), (256, 2048), (512, 2048))


def _batch_heads(shapes):
    query_shape = shapes[0] if shapes else None
    if query_shape is None or query_shape[0] is None or query_shape[2] is None:
        return None
    return query_shape[0] * query_shape[2]


# The native op's variant is its tiles (a ``BlockSizes``). By default 64 query rows
# × 512 keys: the float32 score tile and one key block's keys and values (128 KiB
# each at H = D = 64) stay in a core's L2 cache. Then the others the tuner tries
# (key blocks round up to 16 columns in the op).
NATIVE_BLOCK_SIZES = BlockSizes(block_q=64, block_k=512)
NATIVE_TUNED_BLOCK_SIZES = ((32, 512), (128, 256), (64, 1024))
# The native backward's tiles: it holds three float32 score tiles (P, dropped P, dS)
# besides the key block's operands, so its key blocks are narrower than the forward's.
NATIVE_BACKWARD_BLOCK_SIZES = BlockSizes(block_q=64, block_k=128)


def _kept_variant(first, shapes, is_causal, sliding_window):
    """``first`` as whole rows keeping their probabilities, or None where that does
    not fit the keep budget (or sizes are unknown when traced) or loses the blocks a
    causal mask or a window skips (more than one query block)."""
    query_shape = shapes[0] if shapes else None
    key_shape = shapes[1] if len(shapes) > 1 else None
    if query_shape is None or key_shape is None:
        return None
    t_len, s_len = query_shape[1], key_shape[1]
    if not fits_keep_budget(query_shape[0], query_shape[2], t_len, s_len) or not s_len:
        return None
    block_q = max(1, min(DEFAULT_BLOCK_SIZES.block_q, t_len))
    if sliding_window is not None or (is_causal and block_q < t_len):
        return None
    if kept_bytes(query_shape[0], query_shape[2], block_q, s_len) > tile_budget_bytes():
        return None
    return dataclasses.replace(first, block_q=block_q, block_k=s_len, keep_probabilities=True)


def _default_variant(
    implementation, *, platform, dtype, shapes, is_causal=False, sliding_window=None, block_sizes=None, **_
):
    if implementation == "reference":
        return None
    if implementation == dispatch.NATIVE:
        return block_sizes or NATIVE_BLOCK_SIZES
    # A window skips blocks as a causal mask does: small tiles skip more.
    first = default_variant(
        implementation, platform, dtype, is_causal=is_causal or sliding_window is not None,
        batch_heads=_batch_heads(shapes),
        block_sizes=block_sizes,
    )
    if block_sizes is None and platform_lib.gradient_recording():
        # A training step: the backward reads the probabilities instead of one more
        # product and softmax per tile, where they fit the budget.
        return _kept_variant(first, shapes, is_causal, sliding_window) or first
    return first


def _native_variants(shapes, block_sizes):
    """The native op's tiles: the caller's, or the default then the tuner's others,
    none that runs as an earlier one (the op clips query blocks to T and key blocks to
    S rounded up to 16)."""
    first = block_sizes or NATIVE_BLOCK_SIZES
    if block_sizes is not None:
        return (first,)
    t_len = shapes[0][1] if shapes and shapes[0] is not None else None
    s_len = shapes[1][1] if len(shapes) > 1 and shapes[1] is not None else None

    def runs_as(blocks):
        q = blocks.block_q if t_len is None else min(blocks.block_q, t_len)
        k = blocks.block_k if s_len is None else min(blocks.block_k, -(-s_len // 16) * 16)
        return q, k

    found, seen = [first], {runs_as(first)}
    for block_q, block_k in NATIVE_TUNED_BLOCK_SIZES:
        blocks = BlockSizes(block_q, block_k)
        if runs_as(blocks) not in seen:
            seen.add(runs_as(blocks))
            found.append(blocks)
    return tuple(found)


def _variants(
    implementation, *, platform, dtype, shapes, is_causal=False, sliding_window=None, block_sizes=None, **_
):
    """The default variant, then (for the tuner) the other tiles within the memory
    budget, whole score rows where ``S`` is known and they fit, and on the graph
    path both softmax formulations. The reference has none."""
    if implementation == "reference":
        return ()
    if implementation == dispatch.NATIVE:
        return _native_variants(shapes, block_sizes)
    query_shape = shapes[0] if shapes else None
    key_shape = shapes[1] if len(shapes) > 1 else None
    batch_heads = _batch_heads(shapes)
    first = _default_variant(
        implementation, platform=platform, dtype=dtype, shapes=shapes, is_causal=is_causal,
        sliding_window=sliding_window, block_sizes=block_sizes,
    )
    if block_sizes is not None:
        return (first,)
    t_len = None if query_shape is None else query_shape[1]
    s_len = None if key_shape is None else key_shape[1]
    budget = tile_budget_bytes()
    tiles = list(TUNED_BLOCK_SIZES)
    if s_len is not None:
        tiles = [(q, min(k, s_len)) for q, k in tiles] + [(128, s_len), (256, s_len)]
    if t_len is not None:
        tiles = [(min(q, t_len), k) for q, k in tiles]
    def runs_as(variant):  # tiles beyond T or S run as tiles of T or S (_Plan)
        q = variant.block_q if t_len is None else min(variant.block_q, t_len)
        k = variant.block_k if s_len is None else min(variant.block_k, s_len)
        return q, k, variant.fused_softmax, variant.native_operands, variant.keep_probabilities

    found, seen = [first], {runs_as(first)}
    for fused in (first.fused_softmax, not first.fused_softmax) if implementation == "graph" else (False,):
        for block_q, block_k in tiles:
            if batch_heads is not None and 4 * batch_heads * block_q * block_k > budget:
                continue
            variant = AttentionVariant(block_q, block_k, fused, first.native_operands)
            if runs_as(variant) not in seen:
                seen.add(runs_as(variant))
                found.append(variant)
    # Whole rows that keep their probabilities for the backward, within the keep
    # budget: a candidate wherever they fit, causal or not (the tuner times them).
    if s_len and batch_heads is not None and t_len and fits_keep_budget(query_shape[0], query_shape[2], t_len, s_len):
        for block_q in sorted({min(t_len, DEFAULT_BLOCK_SIZES.block_q), t_len}):
            variant = AttentionVariant(block_q, s_len, False, first.native_operands, keep_probabilities=True)
            if 4 * batch_heads * block_q * s_len > budget:
                continue
            if runs_as(variant) not in seen:
                seen.add(runs_as(variant))
                found.append(variant)
    return tuple(found)


def _signature(
    query, key, value, bias=None, mask=None, *, scale, is_causal, dropout_rate, seed, sliding_window=None,
    block_sizes=None,
):
    """The tuner's key: (B, T, S, N, K, H, D) bucketed; causal, window, bias, mask, dropout."""
    b, t, n, h = query.shape
    s, k, d = key.shape[1], key.shape[2], value.shape[3]
    bucket = tuple(dispatch.size_bucket(size) for size in (b, t, s, n, k, h, d))
    flags = {
        "causal": bool(is_causal),
        "window": None if sliding_window is None else dispatch.size_bucket(sliding_window),
        "bias": bias is not None,
        "mask": mask is not None,
        "dropout": dropout_rate > 0.0,
        "block_sizes": None if block_sizes is None else [block_sizes.block_q, block_sizes.block_k],
    }
    return bucket, flags


def _work(query, key, value, bias=None, mask=None, *, is_causal, sliding_window=None, **_):
    if not (query.shape.is_fully_defined() and key.shape.is_fully_defined()):
        return None
    b, t, n, h = query.shape
    return flops_lib.attention_flops(b, t, key.shape[1], n, h, causal=is_causal, window=sliding_window)


def _layout(selection, query, key, value, bias=None, mask=None, **_):
    return static_layout(query, key, value, bias, mask, lengths=selection.implementation == "xla")


# ---------------------------------------------------------------------------------
# Dropout: a counter-based hash of (seed, batch, head, query, key) positions. It is a
# pure function of the position, so the reference and every block layout (graph, XLA,
# any variant) drop exactly the same probabilities for a given seed.


def _mix(x):
    """A 32-bit integer finalizer (lowbias32): every input bit flips ~half the output."""
    shift = lambda n: tf.constant(n, tf.uint32)  # noqa: E731
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, shift(16)))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, shift(15)))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, shift(16)))


def _seed_words(seed):
    """Two uint32 words from an int, or an integer tensor of shape [] or [2]."""
    seed = tf.reshape(tf.convert_to_tensor(seed), [-1])
    words = tf.cast(tf.cast(seed, tf.int64), tf.uint32)
    return words[0], words[-1] ^ tf.constant(0x9E3779B9, tf.uint32)


def _dropout_multiplier(seed, rate, batch, heads, t_total, t_index, s_index, acc):
    """``keep / (1 - rate)`` for positions ``[B, K, G, t, s]``; dropped ones are 0.

    Args:
        batch: B; heads: (K, G); t_total: T, used to number rows uniquely.
        t_index: [t] int32 query positions; s_index: [s] int32 key positions.
    """
    kv_heads, groups = heads
    seed0, seed1 = _seed_words(seed)
    b = tf.reshape(tf.cast(tf.range(batch), tf.uint32), [-1, 1, 1, 1])
    n = tf.reshape(tf.cast(tf.range(kv_heads * groups), tf.uint32), [1, kv_heads, groups, 1])
    t = tf.reshape(tf.cast(t_index, tf.uint32), [1, 1, 1, -1])
    rows = (b * tf.cast(kv_heads * groups, tf.uint32) + n) * tf.cast(t_total, tf.uint32) + t
    rows = _mix(rows ^ _mix(seed0))[..., None]  # [B, K, G, t, 1]
    cols = _mix(tf.cast(s_index, tf.uint32) ^ seed1)  # [s]
    bits = _mix(rows ^ cols)
    uniform = tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), acc) * (2.0**-24)
    return tf.where(uniform >= rate, tf.cast(1.0 / (1.0 - rate), acc), tf.zeros([], acc))


# ---------------------------------------------------------------------------------
# Shared layout helpers.


def _split_heads(x, kv_heads):
    """``[B, T, N, H]`` → ``[B, K, G, T, H]`` (a reshape and a transpose, no copies of K/V)."""
    shape = tf.shape(x)
    groups = x.shape[2] // kv_heads
    x = tf.reshape(x, [shape[0], shape[1], kv_heads, groups, x.shape[3]])
    return tf.transpose(x, [0, 2, 3, 1, 4])


def _merge_heads(x):
    """``[B, K, G, T, D]`` → ``[B, T, N, D]``."""
    shape = tf.shape(x)
    x = tf.transpose(x, [0, 3, 1, 2, 4])
    return tf.reshape(x, [shape[0], shape[3], x.shape[2] * x.shape[3], x.shape[4]])


def _split_mask_heads(x, kv_heads):
    """A rank-4 mask or bias ``[b, n, t, s]`` (n in {1, N}) → ``[b, k, g, t, s]``."""
    if x.shape[1] == 1:
        return x[:, :, None]
    shape = tf.shape(x)
    return tf.reshape(x, [shape[0], kv_heads, x.shape[1] // kv_heads, shape[2], shape[3]])


def static_layout(query, key, value, bias, mask, *, lengths=False):
    """The static facts the algorithms need: head counts and dims (and with
    ``lengths=True`` the batch size and lengths too), and which axes of ``bias``/
    ``mask`` broadcast.

    A plain tuple, passed as a Python argument, so each layout is its own trace:
    ``tf.function(reduce_retracing=True)`` would otherwise relax these dims to None.
    The graph path leaves B, T and S free, sharing one trace across lengths; XLA
    compiles one program per shape anyway, and with unknown lengths in the trace it
    sizes its loop buffers for bounds far above the real lengths.
    """
    first = 0 if lengths else 2
    ones = lambda x: None if x is None else tuple(d == 1 for d in x.shape)  # noqa: E731
    return (
        tuple(query.shape[first:]),
        tuple(key.shape[first:]),
        tuple(value.shape[first:]),
        ones(bias),
        ones(mask),
    )


def _restore_layout(layout, query, key, value, bias, mask):
    if layout is None:
        return query, key, value, bias, mask
    q_dims, k_dims, v_dims, bias_ones, mask_ones = layout
    free = lambda dims: (None,) * (4 - len(dims)) + tuple(dims)  # noqa: E731
    query = tf.ensure_shape(query, free(q_dims))
    key = tf.ensure_shape(key, free(k_dims))
    value = tf.ensure_shape(value, free(v_dims))
    if bias is not None:
        bias = tf.ensure_shape(bias, [1 if one else None for one in bias_ones])
    if mask is not None:
        mask = tf.ensure_shape(mask, [1 if one else None for one in mask_ones])
    return query, key, value, bias, mask


def _transpose_bool(x, perm):
    """``tf.transpose`` of a boolean tensor, through float32.

    With oneDNN on, TensorFlow hands transposes to oneDNN, which has none for
    booleans (nor integers) on most CPUs and logs "oneDNN supports DT_BOOL only on
    platforms with AVX-512" before falling back; float32 it transposes everywhere.
    A select, not a cast: grappler moves a transpose before a widening cast.
    """
    one, zero = tf.ones([], tf.float32), tf.zeros([], tf.float32)
    return tf.transpose(tf.where(x, one, zero), perm) > 0


def _hide_unseen(query, key, value, mask):
    """Zeros, by a select, the query rows and key/value positions ``mask`` hides from all scores.

    A masked score gets zero weight, but the matmuls still multiply that zero with
    the value (and, in the gradient, with the query and key): ``0·NaN`` is NaN, so
    NaN or Inf in padding would reach every row. Selecting zeros there keeps
    padding out of every product; the positions a score uses are untouched, so
    outputs and gradients are unchanged. ``mask`` is rank 4 ``[b, n, t, s]``
    (size-1 axes broadcast); the key test spans every head, as padding does.
    """
    zero = tf.zeros([], query.dtype)
    rows_seen = _transpose_bool(tf.reduce_any(mask, axis=3, keepdims=True), [0, 2, 1, 3])  # [b, t, n, 1]
    keys_seen = tf.reduce_any(mask, axis=[1, 2])[:, :, None, None]  # [b, s, 1, 1]
    return (
        tf.where(rows_seen, query, zero),
        tf.where(keys_seen, key, zero),
        tf.where(keys_seen, value, zero),
    )


def _in_band(t_index, s_index, window):
    """``[t, s]``: whether key ``s`` lies within ``window - 1`` positions of query ``t``
    (``|t - s| < window``, Keras's ``sliding_window``)."""
    return tf.abs(t_index[:, None] - s_index[None, :]) < window


def _length(x, axis):
    return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


# ---------------------------------------------------------------------------------
# Reference.


def dot_product_attention_reference(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale,
    is_causal=False,
    sliding_window=None,
    dropout_rate=0.0,
    seed=None,
    layout=None,
):
    """The spec: the whole ``[B, N, T, S]`` softmax in float32, then ``· V``.

    ``bias`` and ``mask`` are rank 4 here (``dot_product_attention`` expands them);
    ``layout`` is ``static_layout(...)`` of the inputs.
    """
    query, key, value, bias, mask = _restore_layout(layout, query, key, value, bias, mask)
    if mask is not None:
        query, key, value = _hide_unseen(query, key, value, mask)
    acc = accumulation_dtype(query.dtype)
    kv_heads = key.shape[2]
    q = _split_heads(tf.cast(query, acc), kv_heads)  # [B, K, G, T, H]
    k = tf.cast(key, acc)
    v = tf.cast(value, acc)
    logits = tf.einsum("bkgth,bskh->bkgts", q, k) * tf.cast(scale, acc)
    if bias is not None:
        logits += _split_mask_heads(tf.cast(bias, acc), kv_heads)
    t_len, s_len = _length(query, 1), _length(key, 1)
    valid = None
    if mask is not None:
        valid = _split_mask_heads(mask, kv_heads)
    if is_causal:
        causal = tf.range(t_len)[:, None] >= tf.range(s_len)[None, :]
        valid = causal if valid is None else tf.logical_and(valid, causal)
    if sliding_window is not None:
        band = _in_band(tf.range(t_len), tf.range(s_len), sliding_window)
        valid = band if valid is None else tf.logical_and(valid, band)
    if valid is not None:
        valid = tf.broadcast_to(valid, tf.shape(logits))
        logits = tf.where(valid, logits, mask_value(acc))
    peak = tf.reduce_max(logits, axis=-1, keepdims=True)
    weights = tf.exp(logits - tf.stop_gradient(peak))
    if valid is not None:
        # A row with every key masked has peak = mask value and exp(0) = 1 everywhere:
        # the select zeroes it, so its output is 0 instead of a mean of the values.
        weights = tf.where(valid, weights, tf.zeros([], acc))
    total = tf.reduce_sum(weights, axis=-1, keepdims=True)
    probs = weights / tf.where(total > 0, total, tf.ones([], acc))
    if dropout_rate > 0.0:
        probs *= _dropout_multiplier(
            seed,
            dropout_rate,
            tf.shape(query)[0],
            (kv_heads, query.shape[2] // kv_heads),
            t_len,
            tf.range(t_len),
            tf.range(s_len),
            acc,
        )
    out = tf.einsum("bkgts,bskd->bkgtd", probs, v)
    return tf.cast(_merge_heads(out), query.dtype)


# ---------------------------------------------------------------------------------
# Compiled: blockwise online softmax with a recomputing backward pass.


def _static_sizes(x):
    """Slice sizes: the static dims where known. XLA lowers a slice with a dynamic
    start and a size of -1 by padding the whole operand first (a copy several times
    its size); with every size known it is a plain dynamic-slice."""
    return [-1 if d is None else d for d in x.shape]


class _Plan:
    """Static facts of one compiled call: padded layout, block counts, options."""

    def __init__(self, query, key, value, bias, mask, scale, is_causal, window, rate, seed, blocks, tiles):
        self.acc = accumulation_dtype(query.dtype)
        # Matmul operands: the input dtype where its products accumulate in float32
        # natively, float32 otherwise. Scores, softmax and outputs stay float32.
        self.operand = query.dtype if tiles.native_operands else self.acc
        self.fused_softmax = tiles.fused_softmax
        self.kv_heads = key.shape[2]
        self.groups = query.shape[2] // self.kv_heads
        self.t_len, self.s_len = _length(query, 1), _length(key, 1)
        static_t, static_s = query.shape[1], key.shape[1]
        self.block_q = blocks.block_q if static_t is None else max(1, min(blocks.block_q, static_t))
        self.block_k = blocks.block_k if static_s is None else max(1, min(blocks.block_k, static_s))
        # At least one block, whole padding when T or S is 0: the loops, their arrays
        # and the gradient keep one shape, and the padding masks give what the spec
        # gives, no rows (sliced off) or rows that see no key (zeros).
        self.num_q = _at_least_one((self.t_len + self.block_q - 1) // self.block_q)
        self.num_k = _at_least_one((self.s_len + self.block_k - 1) // self.block_k)
        # Every key in one block (S static and at most block_k): with the fused softmax,
        # a tile's softmax is its rows' whole softmax, with no logsumexp to merge or save.
        self.whole_rows = (
            (tiles.fused_softmax or tiles.keep_probabilities) and isinstance(self.num_k, int) and self.num_k == 1
        )
        self.t_pad = self.num_q * self.block_q
        self.s_pad = self.num_k * self.block_k
        # The forward keeps the whole rows' probabilities for the backward only within
        # the budget, checked on static sizes: above it memory stays linear.
        self.keep = (
            tiles.keep_probabilities
            and self.whole_rows
            and isinstance(self.t_pad, int)
            and fits_keep_budget(query.shape[0], query.shape[2], self.t_pad, self.s_pad)
        )
        self.pads_queries = static_t is None or static_t != self.t_pad
        self.pads_keys = static_s is None or static_s != self.s_pad
        self.is_causal = is_causal
        self.window = window
        self.rate = rate
        self.seed = seed
        self.mask = None if mask is None else self._pad(_split_mask_heads(mask, self.kv_heads))

    def _pad(self, x):
        """Pads the T and S axes of a ``[b, k, g, t, s]`` mask/bias that spans them."""
        t_pad = self.t_pad - self.t_len if x.shape[3] != 1 and self.pads_queries else 0
        s_pad = self.s_pad - self.s_len if x.shape[4] != 1 and self.pads_keys else 0
        if isinstance(t_pad, int) and isinstance(s_pad, int) and t_pad == s_pad == 0:
            return x
        return tf.pad(x, [[0, 0]] * 3 + [[0, t_pad], [0, s_pad]])

    def pad_sequence(self, x, *, queries):
        """Pads axis 1 (T or S) of ``[B, T|S, ...]`` to whole blocks; no copy when whole."""
        if not (self.pads_queries if queries else self.pads_keys):
            return x
        amount = (self.t_pad - self.t_len) if queries else (self.s_pad - self.s_len)
        return tf.pad(x, [[0, 0], [0, amount]] + [[0, 0]] * (x.shape.rank - 2))

    def bias5(self, bias):
        if bias is None:
            return None
        return self._pad(_split_mask_heads(tf.cast(bias, self.acc), self.kv_heads))

    def tile(self, x, i, j):
        """The ``[.., block_q, block_k]`` tile (i, j) of a padded mask/bias (broadcast axes kept)."""
        begin = [0, 0, 0, 0, 0]
        size = _static_sizes(x)
        if x.shape[3] != 1:
            begin[3], size[3] = i * self.block_q, self.block_q
        if x.shape[4] != 1:
            begin[4], size[4] = j * self.block_k, self.block_k
        return tf.slice(x, begin, size)

    def first_key_block_for(self, i):
        """The first key block query block ``i`` sees: with a window, the blocks wholly
        left of the band are skipped (0 otherwise)."""
        if self.window is None:
            return 0
        first_key = tf.maximum(0, i * self.block_q - self.window + 1)
        return first_key // self.block_k

    def key_blocks_for(self, i):
        """The key block after the last one query block ``i`` sees: causal blocks above
        the diagonal and, with a window, blocks wholly right of the band are skipped."""
        if not self.is_causal and self.window is None:
            return self.num_k
        last_row = (i + 1) * self.block_q  # exclusive
        end = last_row if self.is_causal else last_row + self.window - 1  # exclusive key
        return tf.minimum(self.num_k, (end + self.block_k - 1) // self.block_k)

    def first_query_block_for(self, j):
        """The first query block that sees key block ``j`` (0 unless causal or windowed)."""
        first_row = 0
        if self.window is not None:
            first_row = tf.maximum(0, j * self.block_k - self.window + 1)
        if self.is_causal:
            first_row = j * self.block_k
        return first_row // self.block_q

    def query_blocks_for(self, j):
        """The query block after the last one that sees key block ``j``: with a window,
        the blocks wholly below the band are skipped."""
        if self.window is None:
            return self.num_q
        end = (j + 1) * self.block_k + self.window - 1  # exclusive row
        return tf.minimum(self.num_q, (end + self.block_q - 1) // self.block_q)

    def valid(self, i, j):
        """Boolean tile ``[b|1, k|1, g|1, block_q|1, block_k]`` of allowed scores, or None."""
        t_index = i * self.block_q + tf.range(self.block_q)
        s_index = j * self.block_k + tf.range(self.block_k)
        valid = None
        if self.pads_keys:
            valid = (s_index < self.s_len)[None, :]
        if self.is_causal:
            causal = t_index[:, None] >= s_index[None, :]
            valid = causal if valid is None else tf.logical_and(valid, causal)
        if self.window is not None:
            band = _in_band(t_index, s_index, self.window)
            valid = band if valid is None else tf.logical_and(valid, band)
        if self.mask is not None:
            tile = self.tile(self.mask, i, j)
            valid = tile if valid is None else tf.logical_and(valid, tile)
        return valid

    def dropout(self, batch, i, j):
        """Dropout multiplier tile ``[B, K, G, block_q, block_k]``, or None.

        ``batch`` is B, a Python int where known: a loop's accumulators keep their
        static shapes only if the tiles multiplied into them do.
        """
        if self.rate == 0.0:
            return None
        return _dropout_multiplier(
            self.seed,
            self.rate,
            batch,
            (self.kv_heads, self.groups),
            self.t_len,
            i * self.block_q + tf.range(self.block_q),
            j * self.block_k + tf.range(self.block_k),
            self.acc,
        )

    def mask_scores(self, s, bias, i, j, arrange=None):
        """Adds the bias tile to the score tile ``s`` and masks it; returns ``(s, valid)``.

        ``s`` is ``[B, K, G, block_q, block_k]``, or in the arrangement ``arrange``
        maps that layout to (the backward's key-major tiles); ``valid`` comes back in
        the same arrangement, or None when nothing is masked.
        """
        arrange = arrange or (lambda x: x)
        if bias is not None:
            s += tf.cast(arrange(self.tile(bias, i, j)), s.dtype)
        valid = self.valid(i, j)
        if valid is None:
            return s, None
        valid = arrange(valid)
        masked = lambda: tf.where(valid, s, mask_value(s.dtype))  # noqa: E731
        if self.pads_keys and not self.is_causal and self.window is None and self.mask is None:
            # Only key padding to mask, and only the last key block holds padded keys
            # (the lengths are dynamic here): the other tiles skip the select's pass.
            return tf.cond((j + 1) * self.block_k > self.s_len, masked, lambda: s), valid
        return masked(), valid


def _at_least_one(count):
    return max(1, count) if isinstance(count, int) else tf.maximum(1, count)


def _batch(x):
    """B, static when known: loop carries must keep their static shapes."""
    return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def _query_blocks(plan, x):
    """``[B, T_pad, K, G, X]`` → ``[num_q, B, K, G·block_q, X]``: each query tile as
    matmul rows, contiguous, in one copy before the loops (not a transpose per tile)."""
    batch = _batch(x)
    x = tf.reshape(x, [batch, plan.num_q, plan.block_q, plan.kv_heads, plan.groups, x.shape[-1]])
    x = tf.transpose(x, [1, 0, 3, 4, 2, 5])
    return tf.reshape(x, [plan.num_q, batch, plan.kv_heads, plan.groups * plan.block_q, x.shape[-1]])


def _key_blocks(plan, x):
    """``[B, S_pad, K, X]`` → ``[num_k, B, K, block_k, X]``, likewise."""
    batch = _batch(x)
    x = tf.reshape(x, [batch, plan.num_k, plan.block_k, plan.kv_heads, x.shape[-1]])
    return tf.transpose(x, [1, 0, 3, 2, 4])


def _tile_5d(plan, x):
    """``[B, K, G·block_q, X]`` → ``[B, K, G, block_q, X]`` (a free reshape)."""
    return tf.reshape(x, [_batch(x), plan.kv_heads, plan.groups, plan.block_q, x.shape[-1]])


def _tile_4d(plan, x):
    """``[B, K, G, block_q, X]`` → ``[B, K, G·block_q, X]`` (a free reshape)."""
    return tf.reshape(x, [_batch(x), plan.kv_heads, plan.groups * plan.block_q, x.shape[-1]])


def _attention_forward(plan, q_blocks, k_blocks, v_blocks, bias):
    """Blockwise forward on the block-major operands: ``q_blocks`` (scaled) from
    ``_query_blocks``, ``k_blocks``/``v_blocks`` from ``_key_blocks``.

    Returns the output ``[B, T_pad, K, G, D]``, the per-row logsumexp by query
    block, ``[num_q, B, K, G, block_q]`` (None with ``plan.whole_rows``: the gradient
    recomputes the softmax itself), and with ``plan.keep`` the probabilities by
    query block, ``[num_q, B, K, G, block_q, S_pad]``, zero where masked (else None). Every product is a plain batched matmul over
    ``(B, K)`` with one contracted axis (query tiles as ``[B, K, G·block_q, H]``):
    XLA's CPU dot emitter hands those to its fast GEMM.
    """
    acc = plan.acc
    batch, static_batch = tf.shape(q_blocks)[1], q_blocks.shape[1]
    floor = mask_value(acc)
    value_dim = v_blocks.shape[-1]

    def query_block(i, outputs, logsumexps, kept):
        q_i = q_blocks[i]  # [B, K, G·block_q, H]
        stat_shape = tf.concat([[batch], [plan.kv_heads, plan.groups, plan.block_q]], axis=0)

        def scores(j):
            s = tf.cast(tf.matmul(q_i, k_blocks[j], transpose_b=True), acc)
            return plan.mask_scores(_tile_5d(plan, s), bias, i, j)

        def weighted_values(p, j):  # p [B, K, G, block_q, block_k] → p·V [B, K, G, block_q, D]
            drop = plan.dropout(_batch(q_i), i, j)
            if drop is not None:
                p *= tf.cast(drop, p.dtype)
            pv = tf.matmul(tf.cast(_tile_4d(plan, p), plan.operand), v_blocks[j])
            return _tile_5d(plan, tf.cast(pv, acc))

        def fused_key_block(j, out, lse):
            """``out``: the softmax-weighted values of the keys so far; ``lse``: their logsumexp."""
            s, _ = scores(j)
            p = tf.nn.softmax(s)
            # softmax(s) = exp(s - lse_tile); at the row's max score it is exp(max - lse_tile),
            # at least 1/block_k, so the log is accurate. A row with every key of the
            # tile masked gets lse_tile = mask value: zero weight in the merge below.
            tile_lse = tf.reduce_max(s, axis=-1) - tf.math.log(tf.reduce_max(p, axis=-1))
            new_lse = tf.maximum(lse, tile_lse) + tf.math.log1p(tf.exp(-tf.abs(lse - tile_lse)))
            out = out * tf.exp(lse - new_lse)[..., None] + weighted_values(p, j) * tf.exp(tile_lse - new_lse)[..., None]
            return j + 1, out, new_lse

        def key_block(j, out, peak, total):
            s, valid = scores(j)
            new_peak = tf.maximum(peak, tf.reduce_max(s, axis=-1))
            p = tf.exp(s - new_peak[..., None])
            if valid is not None:
                # Keeps rows with every key so far masked at exactly zero weight.
                p = tf.where(valid, p, tf.zeros([], acc))
            correction = tf.exp(peak - new_peak)
            total = total * correction + tf.reduce_sum(p, axis=-1)
            out = out * correction[..., None] + weighted_values(p, j)
            return j + 1, out, new_peak, total

        if plan.whole_rows:
            # Scores stay in the operand dtype when there is no bias to add: oneDNN's
            # softmax computes in float32 whatever its input, and p is narrowed to the
            # operand dtype for p·V anyway.
            s = tf.matmul(q_i, k_blocks[0], transpose_b=True)
            s, valid = plan.mask_scores(_tile_5d(plan, s if bias is None else tf.cast(s, acc)), bias, i, 0)
            p = tf.nn.softmax(s)
            if plan.keep:
                # Zero where masked: rows that see no key weigh nothing, here and in
                # the backward, which then needs no mask.
                if valid is not None:
                    p = tf.where(valid, p, tf.zeros([], p.dtype))
                out = weighted_values(p, 0)
                kept = kept.write(i, p)
            else:
                out = weighted_values(p, 0)
                if valid is not None:  # rows that see no key: zeros, not a mean of the values
                    out = tf.where(tf.reduce_any(valid, axis=-1, keepdims=True), out, tf.zeros([], acc))
            return i + 1, outputs.write(i, tf.transpose(out, [0, 3, 1, 2, 4])), logsumexps, kept

        zero_out = tf.zeros(tf.concat([stat_shape, [value_dim]], axis=0), acc)
        floors = tf.fill(stat_shape, tf.constant(floor, acc))
        loop = dict(maximum_iterations=plan.num_k, parallel_iterations=2)
        more_keys = lambda j, *_: j < plan.key_blocks_for(i)  # noqa: E731
        first = tf.convert_to_tensor(plan.first_key_block_for(i), tf.int32)
        if plan.fused_softmax:
            _, out, lse = tf.while_loop(more_keys, fused_key_block, (first, zero_out, floors), **loop)
            # A row that saw no key kept a logsumexp near the mask value: zeros. A NaN
            # row stays NaN, as in the reference (grappler rewrites not(a <= b) to a > b).
            seen = tf.logical_or(lse > 0.5 * floor, tf.math.is_nan(lse))
            out = tf.where(seen[..., None], out, tf.zeros([], acc))
            lse = tf.where(seen, lse, floors)
        else:
            _, out, peak, total = tf.while_loop(
                more_keys, key_block, (first, zero_out, floors, tf.zeros(stat_shape, acc)), **loop
            )
            # A fully masked row has total 0 and out 0: dividing by 1 keeps it at 0.
            safe_total = tf.where(total > 0, total, tf.ones([], acc))
            out = out / safe_total[..., None]
            lse = peak + tf.math.log(safe_total)
        outputs = outputs.write(i, tf.transpose(out, [0, 3, 1, 2, 4]))  # [B, block_q, K, G, D]
        logsumexps = logsumexps.write(i, lse)
        return i + 1, outputs, logsumexps, kept

    # The kept probabilities' dtype: the scores' (float32, or the operand dtype where
    # whole rows skip the cast, without a bias).
    kept_dtype = plan.operand if bias is None else acc
    _, outputs, logsumexps, kept = tf.while_loop(
        lambda i, *_: i < plan.num_q,
        query_block,
        (
            tf.constant(0),
            tf.TensorArray(acc, size=plan.num_q, element_shape=[static_batch, plan.block_q, plan.kv_heads, plan.groups, value_dim]),
            tf.TensorArray(acc, size=plan.num_q, element_shape=[static_batch, plan.kv_heads, plan.groups, plan.block_q]),
            tf.TensorArray(
                kept_dtype,
                size=plan.num_q if plan.keep else 0,
                element_shape=[static_batch, plan.kv_heads, plan.groups, plan.block_q, plan.block_k],
            ),
        ),
        maximum_iterations=plan.num_q,
        # Graph mode would otherwise run up to 10 query blocks at once, each with its
        # own tiles: memory would no longer be bounded by the tile size.
        parallel_iterations=1,
    )
    out = outputs.stack()  # [num_q, B, block_q, K, G, D]
    if out.shape[1] != 1:  # with one sequence the transpose only moves a unit axis
        out = tf.transpose(out, [1, 0, 2, 3, 4, 5])
    out = tf.reshape(out, [batch, plan.t_pad, plan.kv_heads, plan.groups, value_dim])
    return out, None if plan.whole_rows else logsumexps.stack(), kept.stack() if plan.keep else None


def _reduce_to(x, shape):
    """Sums ``x`` over the axes where the (broadcast) ``shape`` has size 1."""
    axes = [axis for axis, size in enumerate(shape) if size == 1]
    return tf.reduce_sum(x, axis=axes, keepdims=True) if axes else x


def _zero_blocks(dtype, count, block_shape, static_block_shape):
    """``count`` zero blocks to add into with ``_add_block``: a TensorArray, so an
    addition replaces one block, where a scatter into one tensor copies all of it
    per call (TensorFlow; XLA updates either in place)."""
    zeros = tf.zeros(tf.concat([[count], block_shape], axis=0), dtype)
    array = tf.TensorArray(dtype, size=count, element_shape=static_block_shape, clear_after_read=False)
    return array.unstack(zeros)


def _add_block(blocks, index, update):
    return blocks.write(index, blocks.read(index) + update)


def _key_major(x):
    """A ``[b, k, g, block_q, block_k]`` tile (any axis broadcast, leading ones possibly
    absent) → ``[b, k, block_k, g, block_q]``, the backward's arrangement."""
    if x.shape.rank < 5:
        x = x[(None,) * (5 - x.shape.rank)]
    if x.dtype == tf.bool:
        return _transpose_bool(x, [0, 1, 4, 2, 3])
    return tf.transpose(x, [0, 1, 4, 2, 3])


def _attention_backward(plan, q_blocks, k_blocks, v_blocks, bias, out, lse, kept, d_out):
    """Blockwise gradients, recomputing each score tile from the saved logsumexp, or
    with ``plan.keep`` reading it from ``kept`` (the forward's probabilities).

    ``q_blocks``, ``k_blocks``, ``v_blocks``: the forward's block-major operands
    (``q`` scaled, in ``plan.operand``: products accumulate in float32 and every
    elementwise step runs in float32); ``out``, ``d_out``: ``[B, T_pad, K, G, D]``; ``lse``:
    ``[num_q, B, K, G, block_q]``. Key blocks outside,
    query blocks inside: ``dK``/``dV`` of a key block accumulate in the inner loop;
    ``dQ`` (and a bias gradient spanning T or S) is added into block-indexed
    accumulators, so nothing of size ``T·S`` is ever held. Returns ``dQ`` with
    respect to the scaled ``q``.

    Tiles are key-major, ``[B, K, block_k, G·block_q]`` (the transpose of the
    forward's): then ``dV += Pᵀ·dO``, ``dK += dSᵀ·Q`` and ``dQᵀ += Kᵀ·dSᵀ`` are
    products with no transposed left operand, which XLA's CPU dot runs about 1.5x
    faster than the transposed forms (measured at these tile sizes).
    """
    acc = plan.acc
    batch = tf.shape(q_blocks)[1]
    head_dim = q_blocks.shape[-1]
    # Σ_s P·dP per row, by query block like ``lse``: the softmax backward's row term.
    row_dot = tf.reduce_sum(d_out * out, axis=-1)  # [B, T_pad, K, G]
    row_dot = tf.reshape(row_dot, [batch, plan.num_q, plan.block_q, plan.kv_heads, plan.groups])
    row_dot = tf.transpose(row_dot, [1, 0, 3, 4, 2])  # [num_q, B, K, G, block_q]
    # dQᵀ by query block: [num_q, B, K, H, G·block_q].
    d_q0 = _zero_blocks(
        acc,
        plan.num_q,
        tf.stack([batch, plan.kv_heads, head_dim, plan.groups * plan.block_q]),
        [q_blocks.shape[1], plan.kv_heads, head_dim, plan.groups * plan.block_q],
    )
    if bias is not None:
        # Blocks [(num_q|1)·(num_k|1)] of [b, k, g, block_q|1, block_k|1].
        tile = plan.tile(bias, 0, 0)
        bias_blocks = [plan.num_q if bias.shape[3] != 1 else 1, plan.num_k if bias.shape[4] != 1 else 1]
        d_bias0 = _zero_blocks(acc, bias_blocks[0] * bias_blocks[1], tf.shape(tile), tile.shape)
    else:
        d_bias0 = tf.zeros([], acc)

    def query_major(x):
        """``[b, k, block_k, g, block_q]`` → ``[b, k, g, block_q, block_k]``."""
        return tf.transpose(x, [0, 1, 3, 4, 2])

    def split_rows(x):  # [B, K, block_k, G·block_q] → [B, K, block_k, G, block_q]
        return tf.reshape(x, [_batch(x), plan.kv_heads, x.shape[2], plan.groups, plan.block_q])

    def merge_rows(x):  # [B, K, block_k, G, block_q] → [B, K, block_k, G·block_q]
        return tf.reshape(x, [_batch(x), plan.kv_heads, x.shape[2], plan.groups * plan.block_q])

    def per_row(x):  # [B, K, G, block_q] → [B, K, 1, G, block_q], broadcast over keys
        return x[:, :, None]

    do_blocks = _query_blocks(plan, tf.cast(d_out, plan.operand))

    def matmul(a, b, **kwargs):
        """A product of the operands in ``plan.operand``, its result in float32."""
        return tf.cast(tf.matmul(tf.cast(a, plan.operand), tf.cast(b, plan.operand), **kwargs), acc)

    def key_block(j, d_q, d_bias, d_keys, d_values):
        k_j, v_j = k_blocks[j], v_blocks[j]  # [B, K, block_k, H|D]
        k_t = tf.transpose(k_j, [0, 1, 3, 2])  # [B, K, H, block_k]

        def query_block(i, d_k, d_v, d_q, d_bias):
            q_i, do_i = q_blocks[i], do_blocks[i]  # [B, K, G·block_q, H|D]
            if plan.keep:
                p, valid = _key_major(tf.cast(kept[i], acc)), None  # zero where masked
            elif plan.whole_rows:
                s = _tile_5d(plan, matmul(q_i, k_j, transpose_b=True))
                s, valid = plan.mask_scores(s, bias, i, j)
                p = _key_major(tf.nn.softmax(s))
                valid = None if valid is None else _key_major(valid)
            else:
                s = split_rows(matmul(k_j, q_i, transpose_b=True))
                s, valid = plan.mask_scores(s, bias, i, j, arrange=_key_major)
                p = tf.exp(s - per_row(lse[i]))
            if valid is not None:
                p = tf.where(valid, p, tf.zeros([], acc))
            drop = plan.dropout(_batch(q_i), i, j)
            if drop is not None:
                drop = _key_major(drop)
            p_dropped = p if drop is None else p * drop
            d_v += matmul(merge_rows(p_dropped), do_i)
            d_p = split_rows(matmul(v_j, do_i, transpose_b=True))
            if drop is not None:
                d_p *= drop
            d_s = p * (d_p - per_row(row_dot[i]))
            d_k += matmul(merge_rows(d_s), q_i)
            d_q = _add_block(d_q, i, matmul(k_t, merge_rows(d_s)))
            if bias is not None:
                d_s = query_major(d_s)
                d_tile = _reduce_to(d_s, bias.shape[:3] + (d_s.shape[3], d_s.shape[4]))
                d_tile = _reduce_to(d_tile, [None] * 3 + [bias.shape[3], bias.shape[4]])
                row = i if bias.shape[3] != 1 else 0
                column = j if bias.shape[4] != 1 else 0
                d_bias = _add_block(d_bias, row * bias_blocks[1] + column, d_tile)
            return i + 1, d_k, d_v, d_q, d_bias

        _, d_k, d_v, d_q, d_bias = tf.while_loop(
            lambda i, *_: i < plan.query_blocks_for(j),
            query_block,
            (
                tf.convert_to_tensor(plan.first_query_block_for(j), tf.int32),
                tf.zeros_like(k_j, dtype=acc),
                tf.zeros_like(v_j, dtype=acc),
                d_q,
                d_bias,
            ),
            maximum_iterations=plan.num_q,
            parallel_iterations=2,
        )
        return j + 1, d_q, d_bias, d_keys.write(j, d_k), d_values.write(j, d_v)

    _, d_q, d_bias, d_keys, d_values = tf.while_loop(
        lambda j, *_: j < plan.num_k,
        key_block,
        (
            tf.constant(0),
            d_q0,
            d_bias0,
            tf.TensorArray(acc, size=plan.num_k, element_shape=k_blocks.shape[1:]),
            tf.TensorArray(acc, size=plan.num_k, element_shape=v_blocks.shape[1:]),
        ),
        maximum_iterations=plan.num_k,
        parallel_iterations=1,
    )
    # [num_q, B, K, H, G, block_q] → [B, num_q, block_q, K, G, H]
    d_q = tf.reshape(d_q.stack(), [plan.num_q, batch, plan.kv_heads, head_dim, plan.groups, plan.block_q])
    d_q = tf.transpose(d_q, [1, 0, 5, 2, 4, 3])
    d_q = tf.reshape(d_q, [batch, plan.t_pad, plan.kv_heads * plan.groups, head_dim])

    def keys_layout(blocks):  # [num_k, B, K, block_k, X] → [B, S_pad, K, X]
        x = tf.transpose(blocks.stack(), [1, 0, 3, 2, 4])
        return tf.reshape(x, [batch, plan.s_pad, plan.kv_heads, x.shape[-1]])

    if bias is not None:
        # [nq·nk, b, k, g, tq, tk] → [b, k, g, nq, tq, nk, tk] → [b, k·g, T|1, S|1]
        d_bias = d_bias.stack()
        d_bias = tf.reshape(d_bias, tf.concat([bias_blocks, tf.shape(d_bias)[1:]], axis=0))
        d_bias = tf.transpose(d_bias, [2, 3, 4, 0, 5, 1, 6])
        shape = tf.shape(d_bias)
        d_bias = tf.reshape(
            d_bias,
            [shape[0], shape[1] * shape[2], shape[3] * shape[4], shape[5] * shape[6]],
        )
    return d_q, keys_layout(d_keys), keys_layout(d_values), d_bias


def dot_product_attention_compiled(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale,
    is_causal=False,
    sliding_window=None,
    dropout_rate=0.0,
    seed=None,
    selection=None,
    layout=None,
):
    """The graph/XLA algorithm: blockwise online softmax with a recomputing gradient.

    Same signature and semantics as ``dot_product_attention_reference``; ``bias`` and
    ``mask`` are rank 4. Memory stays linear in ``T`` and ``S``: besides one score
    tile, it holds copies of ``q``, ``k`` and ``v`` rearranged block-major (each
    tile's rows contiguous, made once and reused by the gradient), their float32
    casts and block padding where needed, the float32 output and the per-row
    logsumexp; a ``mask`` costs one select over the inputs (``_hide_unseen``). At
    B=1, N=8, H=64 the forward at T=S=32768 peaks at about 330 MiB above its inputs
    under XLA (see ``bench/test_attention.py``). ``selection.variant`` (an
    ``AttentionVariant``; 256x256 tiles and the online softmax without one) gives the
    tiles, whether half-precision matmul operands stay half precision (oneDNN with
    bfloat16 instructions, GPUs) or are cast to float32 (XLA's CPU dot and Eigen have
    no faster half-precision products), and how a score tile's softmax is computed.
    """
    variant = AttentionVariant() if selection is None else selection.variant
    query, key, value, bias, mask = _restore_layout(layout, query, key, value, bias, mask)
    if mask is not None:
        query, key, value = _hide_unseen(query, key, value, mask)
    plan = _Plan(
        query, key, value, bias, mask, scale, is_causal, sliding_window, dropout_rate, seed,
        variant.block_sizes, variant,
    )
    acc = plan.acc
    scale = tf.cast(scale, acc)

    def split(x):  # [B, T, N, X] → [B, T, K, G, X], a free reshape
        shape = tf.shape(x)
        return tf.reshape(x, [shape[0], shape[1], plan.kv_heads, plan.groups, x.shape[-1]])

    def finish(x, dtype):  # [B, T_pad, K, G, X] → [B, T, N, X]
        shape = tf.shape(x)
        x = tf.reshape(x, [shape[0], shape[1], plan.kv_heads * plan.groups, x.shape[-1]])
        if plan.pads_queries:
            x = x[:, : plan.t_len]
        return tf.cast(x, dtype)

    @tf.custom_gradient
    def attend(q_in, k_in, v_in, *maybe_bias):
        # The scale multiplies q once (linear in T), not every score tile.
        q = plan.pad_sequence(split(tf.cast(tf.cast(q_in, acc) * scale, plan.operand)), queries=True)
        k = plan.pad_sequence(tf.cast(k_in, plan.operand), queries=False)
        v = plan.pad_sequence(tf.cast(v_in, plan.operand), queries=False)
        bias5 = plan.bias5(maybe_bias[0]) if maybe_bias else None
        # Block-major copies, made once: the gradient reuses them.
        blocks = _query_blocks(plan, q), _key_blocks(plan, k), _key_blocks(plan, v)
        out, lse, kept = _attention_forward(plan, *blocks, bias5)

        def grad(d_output):
            d_out = plan.pad_sequence(split(tf.cast(d_output, acc)), queries=True)
            d_q, d_k, d_v, d_bias = _attention_backward(plan, *blocks, bias5, out, lse, kept, d_out)
            if plan.pads_keys:
                d_k, d_v = d_k[:, : plan.s_len], d_v[:, : plan.s_len]
            grads = [
                finish(split(d_q * scale), q_in.dtype),
                tf.cast(d_k, k_in.dtype),
                tf.cast(d_v, v_in.dtype),
            ]
            if maybe_bias:
                b_in = maybe_bias[0]
                if b_in.shape[2] != 1:
                    d_bias = d_bias[:, :, : plan.t_len]
                if b_in.shape[3] != 1:
                    d_bias = d_bias[:, :, :, : plan.s_len]
                grads.append(tf.cast(tf.reshape(d_bias, tf.shape(b_in)), b_in.dtype))
            return grads

        return finish(out, query.dtype), grad

    args = (query, key, value) + (() if bias is None else (bias,))
    return attend(*args)


# ---------------------------------------------------------------------------------
# Public entry point.


def _broadcast_error(name, x, target):
    return ValueError(
        f"`{name}` must be broadcastable to [B, N, T, S] = {list(target)}. "
        f"Received: {name}.shape={tuple(x.shape)}"
    )


def _as_rank4(name, x, target):
    """Checks ``x`` broadcasts to ``target`` [B, N, T, S]; returns it with rank 4."""
    rank = x.shape.rank
    if rank is None or rank > 4:
        raise _broadcast_error(name, x, target)
    for size, want in zip(x.shape[::-1], target[::-1]):
        if size is not None and size != 1 and want is not None and size != want:
            raise _broadcast_error(name, x, target)
    while x.shape.rank < 4:
        x = x[None]
    if x.shape[1] is None:
        # The algorithms split the head axis into key/value groups by its static size
        # (1 or N); a head axis unknown at trace time is broadcast to N here.
        static, shape = x.shape, tf.shape(x)
        x = tf.broadcast_to(x, tf.stack([shape[0], target[1], shape[2], shape[3]]))
        x.set_shape([static[0], target[1], static[2], static[3]])
    return x


def _check_attention_inputs(query, key, value, bias, mask, dropout_rate, seed):
    dtype = check_floating("query", query)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape.rank != 4:
            raise ValueError(
                f"`{name}` must have rank 4 ({'[B, T, N, H]' if name == 'query' else '[B, S, K, H]'}). "
                f"Received: {name}.shape={tuple(t.shape)}"
            )
    check_same_dtype("query", dtype, key=key, value=value)
    shapes = f"query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}, value.shape={tuple(value.shape)}"

    def differ(a, b):
        return a is not None and b is not None and a != b

    if differ(query.shape[0], key.shape[0]) or differ(key.shape[0], value.shape[0]):
        raise ValueError(f"`query`, `key` and `value` must have the same batch size B. Received: {shapes}")
    if differ(key.shape[1], value.shape[1]) or differ(key.shape[2], value.shape[2]):
        raise ValueError(
            "`key` and `value` must have the same length S and number of heads K. "
            f"Received: {shapes}"
        )
    if differ(query.shape[3], key.shape[3]):
        raise ValueError(
            "`query` and `key` must have the same head dim H. "
            f"Received: {shapes}"
        )
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads is None or kv_heads is None or heads % kv_heads != 0:
        raise ValueError(
            "The number of key/value heads K must divide the number of query heads N "
            f"(grouped-query attention). Received: N={heads}, K={kv_heads} ({shapes})"
        )
    target = (query.shape[0], heads, query.shape[1], key.shape[1])
    if bias is not None:
        check_floating("bias", bias)
        bias = _as_rank4("bias", bias, target)
    if mask is not None:
        if mask.dtype != tf.bool:
            raise TypeError(f"`mask` must be a boolean tensor. Received: mask.dtype={mask.dtype.name}")
        mask = _as_rank4("mask", mask, target)
    if not isinstance(dropout_rate, numbers.Real) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(
            "Received an invalid value for `dropout_rate`, expected a number in [0, 1). "
            f"Received: dropout_rate={dropout_rate!r}"
        )
    if dropout_rate > 0.0 and seed is None:
        raise ValueError(
            "`seed` is required when `dropout_rate` > 0: dropout here is stateless and "
            f"reproducible. Received: dropout_rate={dropout_rate}, seed=None"
        )
    return bias, mask


def _not_supported_reasons(implementation, *, platform, dtype, sliding_window=None, **_):
    if implementation != dispatch.NATIVE:
        return []
    reasons = native_attention.not_supported_reasons(platform=platform, dtype=dtype)
    if sliding_window is not None:
        reasons.append(
            f"the native op has no sliding window (received sliding_window={sliding_window}); "
            "the compiled paths skip the blocks outside the band"
        )
    return reasons


ATTENTION = dispatch.Kernel(
    "dot_product_attention",
    dot_product_attention_reference,
    dot_product_attention_compiled,
    auto=AUTO["dot_product_attention"],
    not_supported_reasons=_not_supported_reasons,
    native=native_attention.NATIVE,
    variants=_variants,
    default_variant=_default_variant,
    work=_work,
    signature=_signature,
    layout=_layout,
    choice_options=("block_sizes",),
)


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    sliding_window=None,
    dropout_rate=0.0,
    seed=None,
    block_sizes=None,
    implementation=None,
):
    """Scaled dot-product attention with memory linear in the sequence length.

    ``softmax(query · keyᵀ · scale + bias, where mask) · value`` with the softmax in
    float32. A query row whose keys are all masked gets zeros.

    Args:
        query: ``[B, T, N, H]`` floating tensor.
        key: ``[B, S, K, H]`` tensor of the dtype of ``query``; ``K`` divides ``N``
            (grouped-query attention: query head ``n`` uses key head ``n // (N/K)``).
        value: ``[B, S, K, D]`` tensor of the dtype of ``query``.
        bias: optional floating tensor broadcastable to ``[B, N, T, S]``, added to
            the scaled scores. Differentiable.
        mask: optional boolean tensor broadcastable to ``[B, N, T, S]``; True keeps.
            Query rows and key/value positions it hides from every score (padding)
            are never read, so NaN there reaches no other output or gradient; a
            query row the mask leaves visible is read, padded or not.
        scale: multiplier of the scores; None means ``1 / sqrt(H)``.
        is_causal: whether query ``t`` may attend only to keys ``s <= t``.
        sliding_window: None, or a positive int ``w``: query ``t`` attends only to
            keys with ``|t - s| < w`` (Keras's ``sliding_window``, a symmetric band;
            with ``is_causal``, the last ``w`` keys up to ``t``). The compiled paths
            skip the key blocks outside the band, so their work grows with ``T·w``.
        dropout_rate: probability in [0, 1) of dropping each attention probability
            (the survivors are scaled by ``1 / (1 - dropout_rate)``).
        seed: int or integer tensor of shape ``[]`` or ``[2]``, required when
            ``dropout_rate > 0``. The same seed drops the same positions in every
            implementation.
        block_sizes: optional ``BlockSizes`` of the compiled and native paths; None
            lets dispatch choose them (see ``BlockSizes``; the native op's default is
            ``NATIVE_BLOCK_SIZES``).
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"`` (a C++ op built on first use; not inside ``jit_compile``).

    Returns:
        ``[B, T, N, D]`` tensor of the dtype of ``query``.
    """
    dispatch.check_implementation(implementation)
    query = tf.convert_to_tensor(query)
    key = tf.convert_to_tensor(key)
    value = tf.convert_to_tensor(value)
    bias = None if bias is None else tf.convert_to_tensor(bias)
    mask = None if mask is None else tf.convert_to_tensor(mask)
    bias, mask = _check_attention_inputs(query, key, value, bias, mask, dropout_rate, seed)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"`block_sizes` must be a BlockSizes or None. Received: block_sizes={block_sizes!r}"
        )
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral) or sliding_window <= 0
    ):
        raise ValueError(
            "Received an invalid value for `sliding_window`, expected None or a positive "
            f"integer. Received: sliding_window={sliding_window!r}"
        )
    if scale is None:
        if query.shape[-1] == 0:
            raise ValueError(
                "The head dim H (the last axis of `query` and `key`) is 0, so the default "
                "`scale` 1/sqrt(H) is undefined: pass `scale`. "
                f"Received: query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}"
            )
        scale = 1.0 / math.sqrt(query.shape[-1])
    if seed is not None:
        # A tensor, so a new seed per step reuses the traced graph instead of retracing.
        seed = tf.convert_to_tensor(seed)
    return ATTENTION(
        query,
        key,
        value,
        bias,
        mask,
        implementation=implementation,
        scale=float(scale),
        is_causal=bool(is_causal),
        sliding_window=None if sliding_window is None else int(sliding_window),
        dropout_rate=float(dropout_rate),
        seed=seed,
        block_sizes=block_sizes,
    )
