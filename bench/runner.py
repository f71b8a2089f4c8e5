"""Timing, results, comparison and plots for ``fastlayers bench``.

The machine is shared and its speed drifts, so the providers of one group (same
suite, size, policy, mode and device) are measured in interleaved rounds, each
round in a rotated order, and every figure is a median over rounds. Ratios
within a group (fraction of the peak row, speed-up over the Keras built-in) are
therefore far steadier than the GFLOP/s themselves.

A suite whose FLOPs are counted rather than given by a formula (a layer suite,
``fastlayers bench --layer``) may count none; its rows then report time per
call, and ``--compare`` compares those times.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from fastlayers.bench import cases as cases_lib
from fastlayers.bench import flops as flops_lib
from fastlayers.bench import layer_spec
from fastlayers.bench.cases import BASELINE, HEADLINE_POLICIES, MODES, PEAK, Case
from fastlayers.kernels import dispatch

FORMAT = "fastlayers-bench"
FORMAT_VERSION = 1
# A timed sample repeats short calls until it lasts this long, so that timer
# resolution and call overhead do not dominate small sizes.
MIN_SAMPLE_SECONDS = 0.02
CPU_FLAGS_OF_INTEREST = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
    "amx_tile",
)


class BenchError(Exception):
    """Bad input or an unreadable file: reported as one line, never a traceback."""


@dataclasses.dataclass
class Result:
    """One case's measurement and the ratios derived within its group."""

    case: Case
    seconds: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    fraction_of_peak: float | None = None
    speedup_over_baseline: float | None = None
    old_gflops: float | None = None
    old_seconds: float | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def gflops(self) -> float | None:
        """GFLOP/s; None when not measured or when the case counts no FLOPs."""
        if not self.seconds or not self.case.flops:
            return None
        return flops_lib.gflops_per_second(self.case.flops, self.median)

    @property
    def change(self) -> float | None:
        """Relative change of speed against ``--compare``'s run (-0.1 = 10% slower).

        Speed is GFLOP/s, or calls per second for a case that counts no FLOPs.
        """
        if self.gflops is not None:
            return None if self.old_gflops is None else self.gflops / self.old_gflops - 1.0
        if self.median is None or self.old_seconds is None:
            return None
        return self.old_seconds / self.median - 1.0

    def to_json(self) -> dict:
        case = self.case
        return {
            "suite": case.suite.name,
            "size": case.size,
            "shape": dict(case.shape),
            "policy": case.policy,
            "mode": case.mode,
            "device": case.device,
            "provider": case.provider.name,
            "provider_label": case.provider_label if self.error is None else case.provider.name,
            "label": case.suite.label(case.shape),
            "flops": case.flops,
            "flops_source": case.suite.flop_counter or "formula (fastlayers.bench.flops)",
            "seconds": self.seconds,
            "median_seconds": self.median,
            "gflops": self.gflops,
            "fraction_of_peak": self.fraction_of_peak,
            "speedup_over_baseline": self.speedup_over_baseline,
            "error": self.error,
        }


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
    left out of the rounds. Round ``r`` starts at provider ``r`` so that no
    provider always runs right after the same neighbour.
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
        start = r % len(order)
        for i in order[start:] + order[:start]:
            step, calls = steps[i]
            results[i].seconds.append(sample(step, calls))
            tick()
    derive_ratios(results)
    return results


def derive_ratios(results: Sequence[Result]) -> None:
    """Fraction of the peak row and speed-up over the fastest baseline row, within one group."""
    measured = [r for r in results if r.median is not None]
    peak = next((r for r in measured if r.case.provider.role == PEAK), None)
    baseline = min((r for r in measured if r.case.provider.role == BASELINE),
                   key=lambda r: r.median, default=None)
    for result in results:
        if result.median is None:
            continue
        if peak is not None and result.gflops is not None and peak.gflops is not None:
            result.fraction_of_peak = result.gflops / peak.gflops
        # A row of another problem (the attention suites' matmul peak) has no speed-up.
        if baseline is not None and result.case.provider.flops is None:
            result.speedup_over_baseline = baseline.median / result.median


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
    from fastlayers.bench import runner
    results = runner.bench_layer(MyDense, (64, 128), layer_args={"units": 256},
                                 policies=["float32"])
    print(runner.table(results))
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


# --- the machine --------------------------------------------------------------------

def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    present = set(value.split())
                    flags = [flag for flag in CPU_FLAGS_OF_INTEREST if flag in present]
                    break
    except OSError:
        pass
    return model, flags


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """The machine and library versions a result was measured with."""
    import keras

    model, flags = _cpu_info()
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        "onednn": dispatch.onednn_enabled(),
        "cpu_platform": dispatch.cpu_platform(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "fastlayers": _version("fastlayers"),
    }


def machine_name(machine: dict) -> str:
    onednn = "oneDNN on" if machine["onednn"] else "oneDNN off"
    return (
        f"{machine['cpu']} ({machine['cpu_count']} cores, {onednn}), "
        f"TF {machine['tensorflow']}"
    )


# --- files --------------------------------------------------------------------------

def check_writable(path: str, option: str) -> None:
    """Raises BenchError unless ``path`` can be created or replaced (checked before running)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BenchError(f"`{option}` must be a file path, not a directory. Received: {path}")
    if not os.path.isdir(directory):
        raise BenchError(f"`{option}`: directory {directory} does not exist. Received: {path}")
    if not os.access(directory, os.W_OK):
        raise BenchError(f"`{option}`: directory {directory} is not writable. Received: {path}")


def write_atomically(path: str, option: str, write: Callable[[str], None]) -> None:
    """Writes through a temporary file in the same directory, so nothing is half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastlayers-", suffix=suffix)
        os.close(fd)
    except OSError as error:
        raise BenchError(f"`{option}`: cannot write {path}: {error.strerror}") from error
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise BenchError(f"`{option}`: cannot write {path}: {error.strerror}") from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def results_document(results: Sequence[Result], machine: dict, settings: dict) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "settings": settings,
        "results": [r.to_json() for r in results],
    }


def write_json(path: str, document: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
            f.write("\n")

    write_atomically(path, "--json", write)


def load_results(path: str) -> dict[tuple, tuple[float | None, float | None]]:
    """``(GFLOP/s, median seconds)`` by case key from a ``--json`` file.

    Raises BenchError if the file is not a ``fastlayers bench --json`` result.
    """
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as error:
        raise BenchError(f"`--compare`: cannot read {path}: {error.strerror}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchError(
            f"`--compare` expects a `fastlayers bench --json` result; {path} is not JSON"
        ) from error
    if not (isinstance(document, dict) and document.get("format") == FORMAT
            and isinstance(document.get("results"), list)):
        raise BenchError(
            f"`--compare` expects a `fastlayers bench --json` result (\"format\": "
            f"\"{FORMAT}\"); {path} is not one"
        )
    old = {}
    try:
        for row in document["results"]:
            key = (row["suite"], row["size"], row["policy"], row["mode"], row["device"],
                   row["provider"])
            gflops, seconds = row.get("gflops"), row.get("median_seconds")
            if gflops is not None or seconds is not None:
                old[key] = (None if gflops is None else float(gflops),
                            None if seconds is None else float(seconds))
    except (KeyError, TypeError, ValueError) as error:
        raise BenchError(f"`--compare`: {path} has a malformed result row ({error!r})") from error
    return old


def attach_old(results: Sequence[Result], old: dict[tuple, tuple]) -> int:
    """Sets the old figures on the results ``old`` has; returns how many matched."""
    matched = 0
    for result in results:
        if result.case.key in old:
            result.old_gflops, result.old_seconds = old[result.case.key]
            matched += 1
    return matched


def regressions(results: Sequence[Result], percent: float) -> list[Result]:
    """The results slower than their old run by more than ``percent``%."""
    return [r for r in results if r.change is not None and -r.change * 100 > percent]


# --- the table ----------------------------------------------------------------------

def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _duration(seconds: float) -> str:
    """``0.00123`` as ``1.23 ms``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _speed(gflops: float | None, seconds: float | None) -> str:
    """GFLOP/s, or time per call when there is no FLOP count."""
    if gflops is not None:
        # Small layers reach well under 1 GFLOP/s: keep two significant digits.
        return f"{gflops:.1f}" if gflops >= 1 else f"{gflops:.2g}"
    return "-" if seconds is None else f"{_duration(seconds)}/call"


def baseline_header(results: Sequence[Result]) -> str:
    """``vs keras``, ``vs reference``: the speed-up column names its one baseline provider;
    ``vs baseline`` (explained under the table) otherwise."""
    baselines = {r.case.suite.baselines for r in results if r.case.suite.baselines}
    if len(baselines) == 1 and len(only := baselines.pop()) == 1:
        return f"vs {only[0].name}"
    return "vs baseline"


def flop_notes(results: Sequence[Result]) -> list[str]:
    """Lines saying how counted suites got their FLOPs: a heading per counter, a line per case."""
    counted: dict[str, dict[str, str]] = {}
    for r in results:
        suite = r.case.suite
        if not suite.flop_counter:
            continue
        where = f"{suite.name} at {suite.label(r.case.shape)}"
        counted.setdefault(suite.flop_counter, {})[where] = (
            f"{r.case.flops:,.0f}" if r.case.flops else
            "none (no op it knows the FLOPs of), so time per call is shown instead of GFLOP/s")
    lines = []
    for counter, counts in counted.items():
        lines.append(f"FLOPs per call, counted by {counter} on one traced call:")
        lines += [f"  {where}: {count}" for where, count in counts.items()]
    return lines


def table(results: Sequence[Result]) -> str:
    """A plain-text table: case, dtype, GFLOP/s, % of peak, speed-up over the baseline.

    A case with no FLOP count shows its time per call in the GFLOP/s column; lines
    after the table say how the FLOPs of counted suites were counted.
    """
    with_old = any(r.old_gflops is not None or r.old_seconds is not None for r in results)
    header = ["case", "mode", "provider", "dtype", "GFLOP/s", "% of peak",
              baseline_header(results)]
    if with_old:
        header += ["old GFLOP/s", "change"]
    rows = []
    for r in results:
        case = r.case
        if r.error is not None:
            row = [f"{case.suite.name} {case.suite.label(case.shape)}", case.mode,
                   case.provider.name, case.policy, "failed", r.error, ""]
            rows.append(row + (["", ""] if with_old else []))
            continue
        row = [
            f"{case.suite.name} {case.suite.label(case.shape)}" + (
                "" if case.device == "cpu" else f" [{case.device}]"),
            case.mode,
            case.provider_label,
            case.policy,
            _speed(r.gflops, r.median),
            _fmt(None if r.fraction_of_peak is None else 100 * r.fraction_of_peak, ".0f", "%"),
            _fmt(r.speedup_over_baseline, ".2f", "x"),
        ]
        if with_old:
            old = _fmt(r.old_gflops, ".1f") if r.gflops is not None else _speed(None, r.old_seconds)
            row += [old,
                    _fmt(None if r.change is None else 100 * r.change, "+.1f", "%")]
        rows.append(row)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    numeric = {4, 5, 6, 7, 8}

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    notes = flop_notes(results)
    if header[6] == "vs baseline":
        over: dict[str, list[str]] = {}
        for suite in {r.case.suite.name: r.case.suite for r in results}.values():
            if suite.baselines:
                over.setdefault(suite.baseline_text, []).append(suite.name)
        notes.append("vs baseline: speed-up over " + "; ".join(
            f"{text} for {', '.join(names)}" for text, names in over.items()))
    return "\n".join(lines + ([""] + notes if notes else []))


# --- the plot -----------------------------------------------------------------------

def plot(path: str, results: Sequence[Result], machine: dict) -> None:
    """Throughput against size, one line per provider; one panel per policy and mode.

    A suite that counts no FLOPs is drawn as time per call.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r.median is not None]
    by_name = {r.case.suite.name: r.case.suite for r in measured}
    suites = sorted(by_name)
    panels = sorted({(r.case.suite.name, r.case.policy, r.case.mode, r.case.device)
                     for r in measured})
    if not panels:
        raise BenchError("`--plot`: no case was measured, nothing to draw")
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.2 * rows), squeeze=False)
    for ax, (suite_name, policy, mode, device) in zip(axes.flat, panels, strict=False):
        suite = by_name[suite_name]
        panel = [r for r in measured if (r.case.suite.name, r.case.policy, r.case.mode,
                                         r.case.device) == (suite_name, policy, mode, device)]
        # One panel, one unit: GFLOP/s when every size has a FLOP count.
        timed = any(r.gflops is None for r in panel)
        for provider in suite.provider_names:
            rows = sorted((r for r in panel if r.case.provider.name == provider),
                          key=lambda r: r.case.size)
            if rows:
                # Reference rows (peak, Keras) dashed, fastlayers rows solid.
                style = "--" if suite.provider(provider).role else "-"
                ax.plot([r.case.size for r in rows],
                        [1e3 * r.median if timed else r.gflops for r in rows], style,
                        marker="o", label=rows[0].case.provider_label)
        sizes = sorted({r.case.size for r in panel})
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.minorticks_off()
        ax.set_xlabel(suite.x_label)
        ax.set_ylabel("time per call (ms)" if timed else "throughput (GFLOP/s)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{suite.title}\n{policy}, {mode} mode, {device}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"fastlayers bench ({', '.join(suites)}) on {machine_name(machine)}",
                 fontsize=10)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=110)

    try:
        write_atomically(path, "--plot", write)
    finally:
        plt.close(fig)


# --- pytest-benchmark ---------------------------------------------------------------

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
