"""Peer rows from other frameworks: PyTorch's ``scaled_dot_product_attention``.

``torch-sdpa`` computes the attention suites' problem (``[B, N, T, H]`` in torch's
layout, the policy's compute dtype, no mask) with PyTorch's CPU flash attention,
on as many threads as TensorFlow's intra-op pool, measured interleaved with the
other rows of the same run. It is listed only where torch imports
(``pip install "fastlayers[peers]"``). Torch runs its own kernels whatever the
mode: the row times the same call in eager and function mode.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import tensorflow as tf

TORCH_SDPA = "torch-sdpa"


@functools.lru_cache(maxsize=None)
def torch_available() -> bool:
    """Whether torch is installed (found without importing it, which takes seconds)."""
    return importlib.util.find_spec("torch") is not None


def torch_threads() -> int:
    """TensorFlow's intra-op thread count (0 means one per core), for torch."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    return threads or os.cpu_count() or 1


def torch_sdpa(backward: bool):
    """A provider build for PyTorch's SDPA: ``build(shape, policy) -> step``."""

    def build(shape, policy):
        import keras
        import torch

        torch.set_num_threads(torch_threads())
        dtype = getattr(torch, keras.DTypePolicy(policy).compute_dtype)
        b, t, s, n, h = (shape[letter] for letter in "BTSNH")
        generator = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn((b, n, length, h), generator=generator).to(dtype)
            for length in (t, s, s)
        )
        attend = torch.nn.functional.scaled_dot_product_attention
        if backward:
            for x in (q, k, v):
                x.requires_grad_(True)

            def step():
                out = attend(q, k, v)
                return torch.autograd.grad(out.float().sum(), (q, k, v))

        else:

            def step():
                with torch.no_grad():
                    return attend(q, k, v)

        return step

    return build
