"""The numpy oracles of the kernels, in float64, shared by every test that checks one.

Each computes what its kernel's docstring says, the plain way: loops and ``np``
ops, no tiling, no tricks.
"""

import numpy as np


def attention_oracle(q, k, v, bias=None, mask=None, *, scale=None, is_causal=False):
    """float64 numpy: repeat K/V heads, softmax over keys, zeros for fully masked rows."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    k = np.repeat(k, n // kv, axis=2)
    v = np.repeat(v, n // kv, axis=2)
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    valid = np.ones(logits.shape, bool)
    if mask is not None:
        valid &= np.asarray(mask, bool)
    if is_causal:
        valid &= np.tril(np.ones((t, s), bool))
    logits = np.where(valid, logits, -np.inf)
    peak = np.max(logits, axis=-1, keepdims=True, initial=-np.inf)  # S = 0: no key
    weights = np.where(valid, np.exp(logits - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bnts,bsnd->btnd", probs, v)


def pooling_oracle(x, weight, bias, mask=None):
    """float64 numpy, the tutorial's formula with masked steps at zero weight."""
    x = np.asarray(x, np.float64)
    e = np.tanh(x @ np.asarray(weight, np.float64) + np.asarray(bias, np.float64))[..., 0]
    valid = np.ones(e.shape, bool) if mask is None else np.asarray(mask, bool)
    e = np.where(valid, e, -np.inf)
    peak = np.max(e, axis=-1, keepdims=True, initial=-np.inf)  # T = 0: no step
    w = np.where(valid, np.exp(e - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
    total = w.sum(-1, keepdims=True)
    alpha = w / np.where(total > 0, total, 1.0)
    return np.einsum("bt,btf->bf", alpha, x)


def center_zero_oracle(x, size):
    rows, cols = x.shape[-2:]
    top, left = (rows - size[0]) // 2, (cols - size[1]) // 2
    y = np.array(x, dtype=np.float64)
    y[..., top : top + size[0], left : left + size[1]] = 0.0
    return y


def _padding(size, pool, stride, padding):
    if padding == "valid":
        return 0, (size - pool) // stride + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + pool - size, 0)
    return total // 2, out  # TensorFlow's "same": the odd row goes after the input


def pool_oracle(x, pool_size, strides, padding, data_format, upstream=None):
    """Max pooling in numpy; with ``upstream``, also the input gradient.

    A window's gradient goes to the first of its maxima in row-major order.
    """
    if data_format == "channels_first":
        x = x.transpose(0, 2, 3, 1)
        if upstream is not None:
            upstream = upstream.transpose(0, 2, 3, 1)
    b, h, w, c = x.shape
    top, p = _padding(h, pool_size[0], strides[0], padding)
    left, q = _padding(w, pool_size[1], strides[1], padding)
    y = np.empty((b, p, q, c))
    grad = np.zeros_like(x, dtype=np.float64)
    for i in range(p):
        r0 = i * strides[0] - top
        rows = range(max(r0, 0), min(r0 + pool_size[0], h))
        for j in range(q):
            c0 = j * strides[1] - left
            cols = range(max(c0, 0), min(c0 + pool_size[1], w))
            window = x[:, rows.start : rows.stop, cols.start : cols.stop, :]
            flat = window.reshape(b, len(rows) * len(cols), c)
            if flat.size == 0:  # an empty batch or no channels: nothing to pool
                continue
            y[:, i, j, :] = flat.max(axis=1)
            first = flat.argmax(axis=1)  # argmax returns the first maximum
            if upstream is not None:
                for n in range(b):
                    for ch in range(c):
                        r, s = divmod(first[n, ch], len(cols))
                        grad[n, rows.start + r, cols.start + s, ch] += upstream[n, i, j, ch]
    if data_format == "channels_first":
        y, grad = y.transpose(0, 3, 1, 2), grad.transpose(0, 3, 1, 2)
    return y, grad


def normalized_axes(axis, rank):
    """``axis`` (an int or a list/tuple) as sorted non-negative axes of a rank-``rank`` input."""
    return tuple(sorted(a % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis])))


def _expand(weight, axes, rank):
    shape = [1] * rank
    for a, size in zip(axes, np.shape(weight)):
        shape[a] = size
    return np.reshape(weight, shape)


def layer_norm_oracle(x, gamma, beta, axis, epsilon, rms_scaling=False):
    """Keras's formula in float64."""
    axes = normalized_axes(axis, x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x if rms_scaling else x - mean) / np.sqrt(variance + epsilon)
    if gamma is not None:
        y = y * _expand(gamma, axes, x.ndim)
    if beta is not None and not rms_scaling:
        y = y + _expand(beta, axes, x.ndim)
    return y


def rms_norm_oracle(x, scale, axis, epsilon):
    axes = normalized_axes(axis, x.ndim)
    y = x / np.sqrt((x**2).mean(axis=axes, keepdims=True) + epsilon)
    return y if scale is None else y * _expand(scale, axes, x.ndim)
