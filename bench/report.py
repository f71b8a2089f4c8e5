"""What a benchmark run found: results, the ratios within a group, the table, comparisons.

A :class:`Result` is one case's timed samples; the ratios a table shows (fraction
of the peak row, speed-up over the fastest baseline row) are taken within one
group of cases measured together (``fastlayers.bench.runner.measure_group``), and
``--compare`` attaches an earlier run's figures to the same cases.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from fastlayers.bench import flops as flops_lib
from fastlayers.bench.cases import AUTO, BASELINE, PEAK, Case


@dataclasses.dataclass
class Result:
    """One case's measurement and the ratios derived within its group."""

    case: Case
    seconds: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    fraction_of_peak: float | None = None
    speedup_over_baseline: float | None = None
    # The auto row's: the provider of the fastest fixed implementation in its group,
    # and auto's speed-up over it (below 1: auto chose slower than that row ran).
    best_fixed_provider: str | None = None
    speedup_over_best_fixed: float | None = None
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
            "best_fixed_provider": self.best_fixed_provider,
            "speedup_over_best_fixed": self.speedup_over_best_fixed,
            "error": self.error,
        }


def peak_gflops(results: Sequence[Result]) -> float | None:
    """The peak of one group: the fastest GFLOP/s measured in it, when it has a peak row.

    The peak row (``tf.matmul``) is what the machine's matmul library reaches; a
    row faster than it (XLA's dot beats an Eigen matmul, a fused graph beats a
    lone matmul called from a ``tf.function``) is this machine reaching more, and
    becomes the peak, so that fractions of it never exceed 1.
    """
    rates = [r.gflops for r in results if r.gflops is not None]
    has_peak = any(r.case.provider.role == PEAK and r.gflops is not None for r in results)
    return max(rates) if has_peak else None


def speedup(baseline: Result, result: Result) -> float:
    """``baseline``'s time over ``result``'s: the median of their round-by-round ratios
    when both ran every round (each round times every row close together, so what the
    machine did to both cancels, as in the tuner), else the ratio of their medians."""
    if len(baseline.seconds) == len(result.seconds) > 0:
        return statistics.median(b / r for b, r in zip(baseline.seconds, result.seconds))
    return baseline.median / result.median


def derive_ratios(results: Sequence[Result]) -> None:
    """Fraction of the peak (:func:`peak_gflops`) and speed-up over the fastest baseline
    row (:func:`speedup`), within one group; for the auto row, its speed-up over the
    fastest row of a fixed implementation."""
    for result in results:
        result.fraction_of_peak = result.speedup_over_baseline = None
        result.best_fixed_provider = result.speedup_over_best_fixed = None
    measured = [r for r in results if r.median is not None]
    peak = peak_gflops(measured)
    baseline = min((r for r in measured if r.case.provider.role == BASELINE),
                   key=lambda r: r.median, default=None)
    fixed = min((r for r in measured if r.case.provider.implementation not in (None, AUTO)),
                key=lambda r: r.median, default=None)
    for result in results:
        if result.median is None:
            continue
        if peak is not None and result.gflops is not None:
            result.fraction_of_peak = result.gflops / peak
        # A row of another problem (the attention suites' matmul peak) has no speed-up.
        if baseline is not None and result.case.provider.flops is None:
            result.speedup_over_baseline = speedup(baseline, result)
        if fixed is not None and result.case.provider.implementation == AUTO:
            result.best_fixed_provider = fixed.case.provider.name
            result.speedup_over_best_fixed = speedup(fixed, result)

# --- comparison with an earlier run ------------------------------------------

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


SPEEDUP_TEXT = "the median of round-by-round ratios"


def auto_note(results: Sequence[Result]) -> str | None:
    """One line on how auto fared against the fastest fixed implementation of each
    group it ran in: the range of its speed-ups and the group where it was lowest."""
    rows = [r for r in results if r.speedup_over_best_fixed is not None]
    if not rows:
        return None
    low = min(rows, key=lambda r: r.speedup_over_best_fixed)
    high = max(r.speedup_over_best_fixed for r in rows)
    case = low.case
    where = f"{case.suite.name} {case.suite.label(case.shape)}" + (
        "" if case.device == "cpu" else f" [{case.device}]")
    what = f"{where} {case.mode} {case.policy} against {low.best_fixed_provider}"
    if len(rows) == 1:
        return f"auto vs the fastest fixed implementation ({SPEEDUP_TEXT}): {high:.2f}x in {what}"
    return (
        f"auto vs the fastest fixed implementation ({SPEEDUP_TEXT}): "
        f"{low.speedup_over_best_fixed:.2f}x to {high:.2f}x over {len(rows)} groups; lowest: {what}"
    )


PEAK_NOTE = ("% of peak: of the fastest GFLOP/s measured for the same case, dtype and mode "
             "(tf.matmul's, or a row's that beat it)")


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
    if any(r.fraction_of_peak is not None for r in results):
        notes.append(PEAK_NOTE)
    if header[6] == "vs baseline":
        over: dict[str, list[str]] = {}
        for suite in {r.case.suite.name: r.case.suite for r in results}.values():
            if suite.baselines:
                over.setdefault(suite.baseline_text, []).append(suite.name)
        notes.append("vs baseline: speed-up over " + "; ".join(
            f"{text} for {', '.join(names)}" for text, names in over.items()))
    # The last line: how auto's choices fared.
    if (note := auto_note(results)) is not None:
        notes.append(note)
    return "\n".join(lines + ([""] + notes if notes else []))
