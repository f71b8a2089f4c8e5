"""`fastlayers bench`: the runner's interleaving and ratios, the CLI end to end on tiny
sizes, --compare / --fail-on-regression exit codes, bad input, and the pytest suites."""

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from fastlayers.bench import cases, cli, errors, files, flops, plot, report, runner
from fastlayers.kernels import dispatch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--sizes", "8", "--repeats", "2", "--quiet"]
# A small run: one mode, one dtype, the rows the ratios need plus one fastlayers row.
SMALL = TINY + ["--dtypes", "float32", "--modes", "function",
                "--providers", "fastlayers-graph,keras,tf.matmul"]


def run(command):
    """Runs a command from the repository, returning its exit status and output."""
    # Without xdist's worker variables: a pytest started from a worker would believe it
    # is one, and pytest-benchmark disables itself under xdist.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=600, env=env)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fake_suite(log, fail=()):
    def provider(name, role=""):
        def build(shape, policy):
            if name in fail:
                raise ValueError(f"{name} cannot run\nsecond line")
            return lambda: log.append(name)

        return cases.Provider(name, build, role=role)

    return cases.Suite(
        name="fake", title="fake", x_label="n", shape=lambda size: {"M": size},
        flops=lambda s: 1e9, label=lambda s: str(s["M"]),
        providers=(provider("a"), provider("b"), provider("keras", cases.BASELINE),
                   provider("peak", cases.PEAK)),
        quick_sizes=(1,), sweep_sizes=(1, 2),
    )


def test_providers_are_interleaved_in_balanced_rounds(monkeypatch):
    monkeypatch.setattr(runner, "MIN_SAMPLE_SECONDS", 0.0)
    log = []
    suite = fake_suite(log)
    group = cases.cases(suite, [1], ["float32"], ["eager"], ["cpu"])
    results = runner.measure_group(group, repeats=4)
    timed = log[2 * 4:]  # each provider: one warm-up call and one calibration call first
    # every provider first once, and right after each other provider once
    assert timed == ["a", "b", "peak", "keras",
                     "b", "keras", "a", "peak",
                     "keras", "peak", "b", "a",
                     "peak", "a", "keras", "b"]
    assert all(len(r.seconds) == 4 for r in results)


def test_ratios_are_taken_within_the_group():
    suite = fake_suite([])
    a, keras_row, peak = (report.Result(cases.Case(suite, 1, "float32", "eager", "cpu", p))
                          for p in (suite.provider("a"), suite.provider("keras"),
                                    suite.provider("peak")))
    a.seconds, keras_row.seconds, peak.seconds = [2.0, 4.0, 9.0], [8.0], [2.0]
    report.derive_ratios([a, keras_row, peak])
    assert a.gflops == pytest.approx(0.25)  # 1 GFLOP in the 4 s median
    assert a.fraction_of_peak == pytest.approx(0.5)
    assert a.speedup_over_baseline == pytest.approx(2.0)
    assert peak.fraction_of_peak == pytest.approx(1.0)


def test_the_speed_up_is_the_median_of_round_by_round_ratios():
    # In the second round the machine slowed down for keras's call alone: a is 2x
    # keras in every round but that one, which the ratio of medians (6 / 1) would take.
    suite = fake_suite([])
    a, keras_row = (report.Result(cases.Case(suite, 1, "float32", "eager", "cpu", p))
                    for p in (suite.provider("a"), suite.provider("keras")))
    a.seconds, keras_row.seconds = [1.0, 1.0, 3.0], [2.0, 6.0, 6.0]
    report.derive_ratios([a, keras_row])
    assert a.speedup_over_baseline == pytest.approx(2.0)
    assert keras_row.speedup_over_baseline == pytest.approx(1.0)


def test_auto_is_set_against_the_fastest_fixed_implementation_of_its_group():
    def provider(name, implementation=None, role=""):
        return cases.Provider(name, lambda shape, policy: None, role=role,
                              implementation=implementation)

    providers = (provider("fastlayers", cases.AUTO), provider("fastlayers-xla", "xla"),
                 provider("fastlayers-graph", "graph"), provider("fastlayers-float"),
                 provider("keras", role=cases.BASELINE))
    suite = dataclasses.replace(fake_suite([]), providers=providers)
    groups = []
    for mode, (auto, xla, graph) in {"function": ([1.0, 1.0, 1.2], [0.9, 1.0, 1.2], [2.0] * 3),
                                     "eager": ([1.0, 1.1, 1.0], [3.0] * 3, [1.2, 1.1, 1.2])}.items():
        rows = [report.Result(cases.Case(suite, 1, "float32", mode, "cpu", p)) for p in providers]
        # fastlayers-float (no implementation of this problem) is the fastest row: not fixed.
        for row, seconds in zip(rows, (auto, xla, graph, [0.1] * 3, [4.0] * 3)):
            row.seconds = seconds
        report.derive_ratios(rows)
        groups.append(rows)
    (auto_f, *others_f), (auto_e, *_) = groups
    # function: xla is the faster fixed row; the round-by-round ratios 0.9, 1.0, 1.0
    assert (auto_f.best_fixed_provider, auto_f.speedup_over_best_fixed) == (
        "fastlayers-xla", pytest.approx(1.0))
    assert all(r.best_fixed_provider is None for r in others_f)
    # eager: graph; ratios 1.2, 1.0, 1.2
    assert (auto_e.best_fixed_provider, auto_e.speedup_over_best_fixed) == (
        "fastlayers-graph", pytest.approx(1.2))
    groups[0][0].seconds = [1.0, 1.25, 1.2]  # now 0.9, 0.8, 1.0: a median of 0.9
    report.derive_ratios(groups[0])
    assert report.table(groups[0] + groups[1]).splitlines()[-1] == (
        "auto vs the fastest fixed implementation (the median of round-by-round ratios): "
        "0.90x to 1.20x over 2 groups; lowest: fake 1 function float32 against fastlayers-xla")
    assert report.table(groups[1]).splitlines()[-1] == (
        "auto vs the fastest fixed implementation (the median of round-by-round ratios): "
        "1.20x in fake 1 eager float32 against fastlayers-graph")
    # Without an auto row, or without a fixed one, there is no such line.
    for rows in (groups[0][1:], [groups[0][0], groups[0][4]]):
        report.derive_ratios(rows)
        assert "auto vs" not in report.table(rows)


def test_each_suites_rows_say_which_implementation_they_run():
    implementations = {suite.name: [p.implementation for p in suite.providers]
                       for suite in cases.SUITES.values()}
    fixed = list(dispatch.IMPLEMENTATIONS)
    assert implementations["dense"] == implementations["matmul"] == [cases.AUTO, *fixed, None, None]
    # The int8 suite's float Dense computes another problem: not one of its implementations.
    assert implementations["dense-int8"] == [cases.AUTO, *fixed, dispatch.NATIVE, None, None]
    for name in ("attention", "attention-backward"):
        assert implementations[name][:1 + len(dispatch.ALL_IMPLEMENTATIONS)] == [
            cases.AUTO, *dispatch.ALL_IMPLEMENTATIONS]
        assert set(implementations[name][1 + len(dispatch.ALL_IMPLEMENTATIONS):]) == {None}


def test_the_peak_is_the_fastest_row_so_no_fraction_exceeds_one():
    suite = fake_suite([])
    a, keras_row, peak = (report.Result(cases.Case(suite, 1, "float32", "eager", "cpu", p))
                          for p in (suite.provider("a"), suite.provider("keras"),
                                    suite.provider("peak")))
    a.seconds, keras_row.seconds, peak.seconds = [1.0], [8.0], [2.0]  # a beats tf.matmul
    report.derive_ratios([a, keras_row, peak])
    assert a.fraction_of_peak == pytest.approx(1.0)
    assert peak.fraction_of_peak == pytest.approx(0.5)
    assert keras_row.fraction_of_peak == pytest.approx(0.125)
    assert report.table([a, keras_row, peak]).splitlines()[-1] == report.PEAK_NOTE
    # Without a peak row (a layer's suite) there is no peak, whatever is fastest.
    report.derive_ratios([a, keras_row])
    a.fraction_of_peak = keras_row.fraction_of_peak = None
    report.derive_ratios([a, keras_row])
    assert a.fraction_of_peak is None and report.PEAK_NOTE not in report.table([a, keras_row])


def test_a_failing_provider_is_a_row_not_a_crash(monkeypatch):
    monkeypatch.setattr(runner, "MIN_SAMPLE_SECONDS", 0.0)
    suite = fake_suite([], fail={"b"})
    results = runner.measure_group(
        cases.cases(suite, [1], ["float32"], ["eager"], ["cpu"]), repeats=2)
    failed = [r for r in results if r.error]
    assert [r.case.provider.name for r in failed] == ["b"]
    assert failed[0].error == "ValueError: b cannot run"
    assert all(len(r.seconds) == 2 for r in results if not r.error)
    assert "failed" in report.table(results)


def test_speed_up_is_over_the_fastest_baseline_and_a_peak_of_its_own_problem_has_none():
    suite = fake_suite([])
    keras_xla = cases.Provider("keras-xla", lambda shape, policy: None, role=cases.BASELINE)
    matmul = cases.Provider("peak", lambda shape, policy: None, role=cases.PEAK,
                            flops=lambda s: 4e9)
    providers = (suite.provider("a"), suite.provider("keras"), keras_xla, matmul)
    suite = dataclasses.replace(suite, providers=providers)
    a, keras_row, xla_row, peak = (
        report.Result(cases.Case(suite, 1, "float32", "eager", "cpu", p)) for p in providers)
    a.seconds, keras_row.seconds, xla_row.seconds, peak.seconds = [1.0], [4.0], [2.0], [1.0]
    report.derive_ratios([a, keras_row, xla_row, peak])
    assert a.speedup_over_baseline == pytest.approx(2.0)  # over keras-xla, the faster
    assert keras_row.speedup_over_baseline == pytest.approx(0.5)
    assert peak.gflops == pytest.approx(4.0) and peak.speedup_over_baseline is None
    assert a.fraction_of_peak == pytest.approx(0.25)  # 1 GFLOP/s of the peak's 4
    table = report.table([a, keras_row, xla_row, peak])
    assert table.splitlines()[0].split()[-2:] == ["vs", "baseline"]
    assert "vs baseline: speed-up over the fastest of keras, keras-xla for fake" in table


def test_regressions_are_cases_slower_by_more_than_the_threshold():
    suite = fake_suite([])
    rows = []
    for old, seconds in ((1.0, 1.0), (1.0, 1.25), (1.0, 1.05), (None, 9.0)):
        r = report.Result(cases.Case(suite, 1, "float32", "eager", "cpu", suite.provider("a")))
        r.seconds, r.old_gflops = [seconds], old
        rows.append(r)
    assert report.regressions(rows, 10) == [rows[1]]  # 20% slower
    assert report.regressions(rows, 25) == []


def test_plot_draws_one_labelled_line_per_provider(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (drawn.append(fig), savefig(fig, *a, **k))[1])
    results = []
    for size in (8, 16, 32):
        for provider in cases.DENSE.providers:
            result = report.Result(cases.Case(cases.DENSE, size, "float32", "function", "cpu",
                                              provider))
            result.seconds = [1.0]
            results.append(result)
    machine = {"cpu": "Test CPU 9000", "cpu_count": 2, "onednn": False, "tensorflow": "2.21.0"}
    plot.plot(str(tmp_path / "p.png"), results, machine)
    (fig,) = drawn
    (ax,) = fig.axes
    assert ax.get_xlabel() == "rows M of the input"
    assert ax.get_ylabel() == "throughput (GFLOP/s)"
    assert "Test CPU 9000 (2 cores, oneDNN off), TF 2.21.0" in fig.get_suptitle()
    lines = ax.get_lines()
    assert len(lines) == len(cases.DENSE.providers)
    assert all(list(line.get_xdata()) == [8, 16, 32] for line in lines)
    assert [t.get_text() for t in ax.get_legend().get_texts()][1:] == list(
        cases.DENSE.provider_names[1:])


def test_bench_end_to_end_writes_table_json_and_plot(capsys, tmp_path):
    json_path, png_path = tmp_path / "run.json", tmp_path / "run.png"
    code, out, err = run_cli(capsys, "bench", *TINY, "--dtypes", "float32",
                             "--json", str(json_path), "--plot", str(png_path))
    assert code == 0, err
    table, notes = out.split("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == ["case", "mode", "provider", "dtype", "GFLOP/s", "%", "of",
                                "peak", "vs", "keras"]
    assert len(lines) == 2 + len(cases.DENSE.providers) * len(cases.MODES)
    peak_note, auto_note = notes.strip().splitlines()
    assert peak_note == report.PEAK_NOTE
    assert re.fullmatch(
        r"auto vs the fastest fixed implementation \(the median of round-by-round ratios\): "
        r"\d+\.\d\dx to \d+\.\d\dx over 2 groups; lowest: dense 8x1024 -> 4096 "
        r"(function|eager) float32 against fastlayers-(reference|graph|xla)", auto_note), auto_note
    assert "fastlayers (auto: " in out
    document = json.loads(json_path.read_text())
    assert document["format"] == files.FORMAT
    machine = document["machine"]
    for key in ("cpu", "cpu_flags", "onednn", "cpu_platform", "tensorflow", "keras", "numpy",
                "fastlayers"):
        assert key in machine
    rows = document["results"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in cases.DENSE.provider_names for m in cases.MODES}
    for row in rows:
        assert row["error"] is None and row["gflops"] > 0
        assert row["shape"] == {"M": 8, "K": 1024, "N": 4096}
        assert 0 < row["fraction_of_peak"] <= 1
        if row["provider"] == "keras":
            assert row["speedup_over_baseline"] == pytest.approx(1.0)
        if row["provider"] == "fastlayers":
            assert row["best_fixed_provider"].startswith("fastlayers-")
            assert row["speedup_over_best_fixed"] > 0
        else:
            assert row["best_fixed_provider"] is row["speedup_over_best_fixed"] is None
    for mode in cases.MODES:  # the fastest row of each group is the peak
        assert max(r["fraction_of_peak"] for r in rows if r["mode"] == mode) == 1.0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["run.json", "run.png"]  # no temporary left


def test_attention_suite_writes_table_json_and_plot(capsys, tmp_path):
    json_path, png_path = tmp_path / "run.json", tmp_path / "run.png"
    code, out, err = run_cli(capsys, "bench", "--suite", "attention", "--sizes", "64",
                             "--repeats", "2", "--quiet", "--dtypes", "float32",
                             "--modes", "function", "--json", str(json_path),
                             "--plot", str(png_path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[-2:] == ["vs", "baseline"]
    rows = [line for line in lines if line.startswith("attention B=4 T=S=64 N=8 H=64 ")]
    assert len(rows) == len(cases.ATTENTION.providers)
    side = cases.ATTENTION_PEAK_SIDE
    for label in ("fastlayers (auto: ", "fastlayers-reference", "fastlayers-graph",
                  "fastlayers-xla", "keras ", "keras-xla",
                  f"tf.matmul ({side}x{side} @ {side}x{side})"):
        assert any(label in row for row in rows), label
    assert "speed-up over the fastest of keras, keras-xla for attention" in out
    # One group: auto against the fastest of the fixed rows, on the table's last line.
    assert re.fullmatch(
        r"auto vs the fastest fixed implementation \(the median of round-by-round ratios\): "
        r"\d+\.\d\dx in attention B=4 T=S=64 N=8 H=64 function float32 against "
        r"fastlayers-(reference|graph|xla|native)", lines[-1]), lines[-1]
    document = json.loads(json_path.read_text())
    results = {row["provider"]: row for row in document["results"]}
    assert set(results) == set(cases.ATTENTION.provider_names)
    attention = flops.attention_flops(4, 64, 64, 8, 64)
    for name, row in results.items():
        assert row["error"] is None and row["gflops"] > 0, row
        assert row["suite"] == "attention" and row["mode"] == "function"
        assert row["shape"] == {"B": 4, "T": 64, "S": 64, "N": 8, "H": 64}
        assert row["flops"] == (flops.dense_flops(side, side, side) if name == "tf.matmul"
                                else attention)
    assert max(row["fraction_of_peak"] for row in results.values()) == 1.0
    assert results["tf.matmul"]["speedup_over_baseline"] is None
    keras_rows = [results["keras"]["speedup_over_baseline"],
                  results["keras-xla"]["speedup_over_baseline"]]
    assert max(keras_rows) == pytest.approx(1.0) and min(keras_rows) <= 1.0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["run.json", "run.png"]


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A --json result of the SMALL run, as a later run would compare against."""
    path = tmp_path_factory.mktemp("old") / "old.json"
    assert cli.main(["bench", *SMALL, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def scaled(document, factor, path):
    document = json.loads(json.dumps(document))
    for row in document["results"]:
        row["gflops"] *= factor
    path.write_text(json.dumps(document))
    return str(path)


def test_compare_shows_the_change_and_passes_when_not_slower(capsys, tmp_path, old_run):
    old = scaled(old_run, 0.01, tmp_path / "slow-old.json")  # the old run was 100x slower
    code, out, err = run_cli(capsys, "bench", *SMALL, "--compare", old,
                             "--fail-on-regression", "10")
    assert code == 0, err
    assert "old GFLOP/s" in out.splitlines()[0] and "change" in out.splitlines()[0]
    assert "regression" not in err


def test_fail_on_regression_exits_1_when_slower(capsys, tmp_path, old_run):
    old = scaled(old_run, 100.0, tmp_path / "fast-old.json")  # the old run was 100x faster
    code, out, err = run_cli(capsys, "bench", *SMALL, "--compare", old,
                             "--fail-on-regression", "10")
    assert code == cli.EXIT_REGRESSION
    assert "regression over 10%" in err and "tf.matmul" in err
    # Without the threshold a comparison only reports.
    code, out, _ = run_cli(capsys, "bench", *SMALL, "--compare", old)
    assert code == 0 and "change" in out.splitlines()[0]


# {tmp} is the test's own directory, holding "a-file", "not.json" (text) and
# "pytest-benchmark.json" (JSON that is not a `fastlayers bench` result).
BAD_INPUTS = [
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--providers", "fastlayers,nope"], "unknown provider 'nope'"),
    (["--suite", "attention", "--providers", "fastlayers,nope"],
     "unknown provider 'nope' for suite attention"),
    (["--suite", "dense", "--providers", "keras-xla"],
     "unknown provider 'keras-xla' for suite dense"),
    (["--dtypes", "float64"], "unknown dtype policy 'float64'"),
    (["--suite", "attention", "--dtypes", "float64"], "unknown dtype policy 'float64'"),
    (["--modes", "lazy"], "unknown mode 'lazy'"),
    (["--sizes", "0"], "invalid size '0'"),
    (["--repeats", "0"], "expected a positive integer"),
    (["--json", "{tmp}/missing-dir/r.json"], "does not exist"),
    (["--json", "{tmp}/a-file/r.json"], "does not exist"),
    (["--json", "{tmp}"], "not a directory"),
    (["--plot", "{tmp}/missing-dir/r.png"], "does not exist"),
    (["--compare", "{tmp}/not.json"], "is not JSON"),
    (["--compare", "{tmp}/pytest-benchmark.json"], "is not one"),
    (["--compare", "{tmp}/absent.json"], "cannot read"),
    (["--fail-on-regression", "5"], "needs --compare"),
    (["--fail-on-regression", "-5", "--compare", "{tmp}/not.json"], "non-negative"),
]


@pytest.mark.parametrize(
    "argv, message", BAD_INPUTS, ids=[" ".join(argv) for argv, _ in BAD_INPUTS]
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, argv, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not.json").write_text("GFLOP/s: 12\n")
    (tmp_path / "pytest-benchmark.json").write_text(
        json.dumps({"machine_info": {}, "benchmarks": []}))
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    if "--json" not in argv:
        argv += ["--json", str(tmp_path / "out.json")]
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_cli(capsys, "bench", *TINY, *argv)
    assert code == cli.EXIT_USAGE
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("fastlayers bench: error: ") and message in err
    assert "Traceback" not in err and out == ""
    assert sorted(os.listdir(tmp_path)) == before


def _retrace_one_function_in_new_wrappers(fn):
    import tensorflow as tf

    for n in range(8):  # TensorFlow warns from the fifth trace of one Python function
        tf.function(fn)(tf.constant(float(n)))


def test_bench_drops_only_the_retracing_warning_of_its_fresh_wrappers(caplog, monkeypatch):
    import tensorflow as tf

    _retrace_one_function_in_new_wrappers(lambda x: x + 1)
    assert "triggered tf.function retracing" in caplog.text
    caplog.clear()

    def bench(args):
        _retrace_one_function_in_new_wrappers(lambda x: x + 2)
        tf.get_logger().warning("another warning")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "bench", dataclasses.replace(cli.COMMANDS["bench"], run=bench))
    assert cli.main(["bench"]) == 0
    assert "another warning" in caplog.text
    assert "retracing" not in caplog.text


def test_console_script_runs_and_fails_cleanly(tmp_path):
    script = shutil.which("fastlayers", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "fastlayers.bench.cli"]
    done = run(command + ["bench", *SMALL])
    assert done.returncode == 0, done.stderr
    assert "tf.matmul" in done.stdout and "fastlayers bench on " in done.stderr
    done = run(command + ["bench", "--dtypes", "int8"])
    assert done.returncode == cli.EXIT_USAGE
    # One line in all: TensorFlow's native start-up logging is kept out of it too.
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("fastlayers bench: error: argument --dtypes: unknown dtype policy "
                           "'int8'")


def test_pytest_benchmark_suite_runs_saves_and_compares(tmp_path):
    """`pytest bench --benchmark-only` with --benchmark-json/-save/-compare, tiny sizes."""
    base = [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q",
            "--bench-sizes", "16",
            "-k", "test_dense and cpu and float32 and function and not mixed "
            "and (keras or tf.matmul)",
            "--benchmark-storage", str(tmp_path / "storage"), "-p", "no:cacheprovider"]
    report = tmp_path / "bench.json"
    done = run(base + ["--benchmark-json", str(report), "--benchmark-save", "one"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    benchmarks = json.loads(report.read_text())["benchmarks"]
    assert {b["extra_info"]["provider"] for b in benchmarks} == {"keras", "tf.matmul"}
    for b in benchmarks:
        info = b["extra_info"]
        assert info["gflops"] > 0 and info["fraction_of_peak"] > 0
        assert (info["mode"], info["policy"], info["device"]) == ("function", "float32", "cpu")
        assert info["shape"] == {"M": 16, "K": 1024, "N": 4096}
    done = run(base + ["--benchmark-compare", "0001"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0001_one" in done.stdout


def test_bare_fastlayers_prints_the_usage_and_the_commands(capsys):
    code, out, err = run_cli(capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: fastlayers ")
    assert "--version" in out
    words = " ".join(out.split())  # argparse wraps its lines
    for name, command in cli.COMMANDS.items():
        assert f" {name} {command.help} " in words, name


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"fastlayers {importlib.metadata.version('fastlayers')}\n"


def test_an_unknown_command_is_one_line_naming_the_commands(capsys):
    code, out, err = run_cli(capsys, "benchmark")
    assert code == cli.EXIT_USAGE and out == ""
    assert err.startswith("fastlayers: error: argument COMMAND: invalid choice: 'benchmark' "
                          "(choose from ")
    assert len(err.splitlines()) == 1 and all(f"'{name}'" in err for name in cli.COMMANDS)


def test_help_names_the_modes_and_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert ("--modes MODES comma-separated modes: eager (each call from Python), function "
            "(calls inside a tf.function) (default: eager,function)") in out
    assert "the median is reported (default: 5)" in out
    with pytest.raises(SystemExit):
        cli.main(["profile", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("Keras dtype policy (default: float32)", "(default: auto)",
                    "tf.function) (default: eager)", "warm-up steps (default: 5)"):
        assert default in out


def test_a_subcommand_is_one_registration(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    ran = []

    def add_arguments(parser):
        parser.add_argument("--times", type=int, default=1)

    def run_echo(args):
        if args.times < 1:
            raise errors.CommandError(f"`--times` must be positive. Received: {args.times}")
        ran.append(args.times)
        return 0

    cli.register(cli.Command("echo", help="say it again", description="Says it again.",
                             add_arguments=add_arguments, run=run_echo, extra=None))
    assert " echo say it again " in " ".join(run_cli(capsys)[1].split())
    assert run_cli(capsys, "echo", "--times", "3") == (0, "", "")
    assert ran == [3]
    assert run_cli(capsys, "echo", "--times", "0") == (
        cli.EXIT_USAGE, "", "fastlayers echo: error: `--times` must be positive. Received: 0\n")
    with pytest.raises(ValueError, match="Received: name='echo' \\(already registered\\)"):
        cli.register(cli.COMMANDS["echo"])
