"""Timing for ``fastlayers bench``: interleaved rounds, medians, one layer's run.

The machine is shared and its speed drifts, so the providers of one group (same
suite, size, policy, mode and device) are measured in interleaved rounds, each
round in a balanced order (every provider right after every other equally
often), and every figure is a median over rounds. Ratios
within a group (fraction of the peak row, speed-up over the Keras built-in) are
therefore far steadier than the GFLOP/s themselves (``fastlayers.bench.report``
derives them and prints the table).

A suite whose FLOPs are counted rather than given by a formula (a layer suite,
``fastlayers bench --layer``) may count none; its rows then report time per
call, and ``--compare`` compares those times.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence

from fastlayers.bench import cases as cases_lib
from fastlayers.bench import layer_spec
from fastlayers.bench.cases import HEADLINE_POLICIES, MODES, Case
from fastlayers.bench.report import Result, derive_ratios
from fastlayers.kernels import tuning

# A timed sample repeats short calls until it lasts this long, so that timer
# resolution and call overhead do not dominate small sizes.
MIN_SAMPLE_SECONDS = 0.02


def calibrate(step: Callable[[], object]) -> int:
    """How many calls make one sample of at least ``MIN_SAMPLE_SECONDS``."""
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / max(elapsed, 1e-9)))


def sample(step: Callable[[], object], calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def ticks_per_group(providers: int, repeats: int) -> int:
    """Progress units for one group: a warm-up per provider, then each timed sample."""
    return providers * (1 + repeats)


def measure_group(
    group: Sequence[Case], repeats: int, tick: Callable[[], None] = lambda: None
) -> list[Result]:
    """Measures the cases of one group in ``repeats`` interleaved rounds.

    Each provider is built, warmed up (tracing and compiling) and calibrated
    first; a provider that fails to build or run is reported with its error and
    left out of the rounds. Round ``r`` runs them in ``round_order(n, r)``, so that
    no provider always runs first or right after the same neighbour (with rotated
    rounds, the row that always followed PyTorch's measured 7-15% below its twin).
    """
    results = [Result(case) for case in group]
    steps = {}
    for i, result in enumerate(results):
        try:
            step = result.case.build()
            step()  # trace, compile, allocate
            steps[i] = (step, calibrate(step))
        except Exception as error:  # noqa: BLE001 — a row's failure is a result, shown in the table
            first_line = str(error).splitlines()[0] if str(error) else ""
            result.error = f"{type(error).__name__}: {first_line}"
            for _ in range(repeats):
                tick()
        tick()
    order = sorted(steps)
    for r in range(repeats if order else 0):
        for i in [order[j] for j in tuning.round_order(len(order), r)]:
            step, calls = steps[i]
            results[i].seconds.append(sample(step, calls))
            tick()
    derive_ratios(results)
    return results


def groups(cases: Sequence[Case]) -> list[list[Case]]:
    """Cases split into their groups, in first-seen order."""
    grouped: dict[tuple, list[Case]] = {}
    for case in cases:
        grouped.setdefault(case.group, []).append(case)
    return list(grouped.values())


def run(cases: Sequence[Case], repeats: int, progress: bool = True) -> list[Result]:
    """Measures every case, group by group, with a progress bar on stderr."""
    from tqdm import tqdm

    grouped = groups(cases)
    total = sum(ticks_per_group(len(g), repeats) for g in grouped)
    results: list[Result] = []
    with tqdm(
        total=total, desc="fastlayers bench", unit="step", file=sys.stderr,
        disable=not progress, leave=False, mininterval=0.5,
    ) as bar:
        for group in grouped:
            bar.set_postfix_str(" ".join(str(part) for part in group[0].group))
            results.extend(measure_group(group, repeats, lambda: bar.update(1)))
    return results


def bench_layer(
    layer,
    input_shape=None,
    *,
    layer_args: dict | None = None,
    sizes: Sequence[int] | None = None,
    policies: Sequence[str] = HEADLINE_POLICIES,
    modes: Sequence[str] = MODES,
    device: str = "cpu",
    providers: Sequence[str] | None = None,
    repeats: int = 5,
    progress: bool = False,
) -> list[Result]:
    """Measures one layer as ``fastlayers bench --layer`` does.

    Example:

    ```python
    from fastlayers.bench import report, runner
    results = runner.bench_layer(MyDense, (64, 128), layer_args={"units": 256},
                                 policies=["float32"])
    print(report.table(results))
    ```

    Args:
        layer: a fastlayers layer name (``"Dense"``), ``"module:Class"`` or a Keras
            layer class (see ``fastlayers.bench.layer_spec``).
        input_shape: one shape, or one per input, batch axis first.
        layer_args: constructor arguments.
        sizes: batch sizes (default: the input shape's).
        policies: Keras dtype policies.
        modes: ``"eager"`` and/or ``"function"``.
        device: ``"cpu"`` or ``"gpu"``.
        providers: a subset of ``auto``, ``reference``, ``graph``, ``xla`` for a
            ``FastLayer`` (default: all); a plain Keras layer has ``layer`` only.
        repeats: interleaved timed rounds; each figure is their median.
        progress: show a progress bar on stderr.

    Raises:
        fastlayers.bench.layer_spec.LayerError: the layer cannot be resolved,
            built or called on ``input_shape``.
        ValueError: a provider the layer's suite does not have.
    """
    spec = layer_spec.resolve_layer(layer, input_shape=input_shape, layer_args=layer_args)
    suite = cases_lib.layer_suite(spec)
    unknown = [name for name in providers or () if name not in suite.provider_names]
    if unknown:
        raise ValueError(f"Received an invalid value for `providers`, expected some of "
                         f"{', '.join(suite.provider_names)}. Received: providers={unknown}")
    chosen = cases_lib.cases(
        suite, sizes or suite.quick_sizes, policies, modes, [device], providers)
    return run(chosen, repeats, progress=progress)
