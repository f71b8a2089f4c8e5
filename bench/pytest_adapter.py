"""The benchmark suites under pytest-benchmark (``pytest bench --benchmark-only``).

The ``bench/test_*.py`` modules parametrize over ``DEVICE_PARAMS`` and time each
case with :func:`benchmark_case`; ``fastlayers bench`` needs neither pytest nor
this module.
"""

from __future__ import annotations

import pytest
from fastlayers.bench import flops as flops_lib
from fastlayers.bench.cases import PEAK, Case, gpu_available
from fastlayers.bench.runner import calibrate, measure_group

# GPU cases skip with a reason on machines without one.
DEVICE_PARAMS = (
    "cpu",
    pytest.param(
        "gpu",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not gpu_available(), reason="no GPU visible to TensorFlow"),
        ],
    ),
)
PYTEST_ROUNDS = 5


def benchmark_case(benchmark, case: Case, rounds: int = PYTEST_ROUNDS) -> None:
    """Times one case with pytest-benchmark's fixture and records derived figures.

    ``extra_info`` gets GFLOP/s (from pytest-benchmark's median) and the fraction
    of the peak row. The machine's speed drifts between one test and the next, so
    the fraction comes from a second, interleaved measurement of this case beside
    the peak row (``measure_group``) rather than from two tests minutes apart.
    """
    benchmark.group = " ".join(str(part) for part in case.group)
    step = case.build()
    step()  # trace and compile outside the timed rounds
    if benchmark.disabled:  # --benchmark-disable: a smoke run, no statistics
        benchmark(step)
        return
    benchmark.pedantic(step, rounds=rounds, iterations=calibrate(step), warmup_rounds=1)
    median = benchmark.stats.stats.median
    peak = case.suite.peak
    if case.provider.role == PEAK:
        fraction = 1.0
    elif peak is None:
        fraction = None
    else:
        pair = measure_group([case, case.with_provider(peak)], rounds)
        fraction = pair[0].fraction_of_peak
    benchmark.extra_info.update(
        {
            "gflops": flops_lib.gflops_per_second(case.flops, median) if case.flops else None,
            "fraction_of_peak": fraction,
            "suite": case.suite.name,
            "provider": case.provider_label,
            "mode": case.mode,
            "policy": case.policy,
            "device": case.device,
            "shape": dict(case.shape),
            "flops": case.flops,
        }
    )
