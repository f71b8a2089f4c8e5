"""``fastlayers bench --plot``: throughput against size, drawn with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastlayers.bench.files import BenchError, write_atomically
from fastlayers.bench.machine import machine_name


def plot(path: str, results: Sequence, machine: dict) -> None:
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
