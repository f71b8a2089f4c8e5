"""FLOP formulas for the benchmarks: the one definition lives in ``fastlayers.kernels.flops``,
where auto-dispatch uses them too (kernels may not import the bench package)."""

from fastlayers.kernels.flops import (  # noqa: F401
    ATTENTION_BACKWARD_FACTOR,
    attention_flops,
    dense_flops,
    gflops_per_second,
)
