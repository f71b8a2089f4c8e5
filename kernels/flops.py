"""FLOP counts: the one place the formulas live (benchmarks and auto-dispatch).

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


def gflops_per_second(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9
