"""FLOP counts: the one place the formulas live (benchmarks, auto-dispatch, the tuner).

Shape letters as in the kernels: dense ``[M, K]·[K, N]``; attention batch ``B``,
query length ``T``, key length ``S``, heads ``N``, head dim ``H``.
"""

from __future__ import annotations

# The backward pass of attention recomputes scores and runs four matmuls to the
# forward's two: counted, by convention, as 2.5 forward passes.
ATTENTION_BACKWARD_FACTOR = 2.5


def dense_flops(m: int, k: int, n: int) -> int:
    """``2·M·K·N``: one multiply and one add per term of each output."""
    return 2 * m * k * n


def attention_flops(
    b: int, t: int, s: int, n: int, h: int, *, causal: bool = False, backward: bool = False
) -> float:
    """``4·B·N·T·S·H`` for QKᵀ and PV; half when causal; times 3.5 forward+backward."""
    flops = 4.0 * b * n * t * s * h
    if causal:
        flops /= 2
    if backward:
        flops *= 1 + ATTENTION_BACKWARD_FACTOR
    return flops


def elementwise_flops(elements: int, per_element: int = 1) -> int:
    """``per_element`` operations on each of ``elements`` values."""
    return elements * per_element


def normalization_flops(elements: int, *, rms: bool = False) -> int:
    """Layer normalization: 8 per element (the mean's add, the deviation, its square
    and sum, the scale, gamma, beta; rsqrt per row is negligible); RMS: 4 (square,
    sum, rsqrt's multiply, scale)."""
    return elements * (4 if rms else 8)


def pooling_flops(outputs: int, pool_size: tuple[int, int]) -> int:
    """One comparison per window element of every output: ``outputs·ph·pw``."""
    return outputs * pool_size[0] * pool_size[1]


def attention_pooling_flops(b: int, t: int, f: int) -> int:
    """``2·B·T·F`` for the scores and ``2·B·T·F`` for the weighted sum."""
    return 4 * b * t * f


def gflops_per_second(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9
