"""`fastlayers bench --layer` and `fastlayers profile` on a user's own layer (module:Class)
and on the built-ins by name: one resolver, FLOPs from TensorFlow's op counter, time per
call when it counts none, and bad input as one line with nothing written."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from fastlayers.bench import cases, cli, layer_spec, plot, profile, report, runner
from fastlayers.kernels import dispatch
from fastlayers.kernels.auto import DEFAULT

MODULE = "fl_user_layers"
SOURCE = textwrap.dedent('''
    import keras
    import tensorflow as tf
    from fastlayers import layers


    class MyDense(layers.CompiledLayer):
        def __init__(self, units, activation=None, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.activation = keras.activations.get(activation)

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], self.units))
            self.bias = self.add_weight(shape=(self.units,), initializer="zeros")

        def call(self, x):
            return self.activation(x @ self.kernel + self.bias)


    class Exp(layers.CompiledLayer):
        """Only ops TensorFlow's op counter has no FLOP count for."""

        def call(self, x):
            return tf.exp(x)


    class Plain(keras.layers.Layer):
        """A tutorial layer: no **kwargs, so no dtype argument."""

        def __init__(self, units=4):
            super().__init__()
            self.units = units

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], self.units))

        def call(self, x):
            return x @ self.w


    class Pool2x2(layers.CompiledLayer):
        def build(self, input_shape):
            if len(input_shape) != 4:
                raise ValueError("Pool2x2 expects a 4D input (batch, height, width, channels). "
                                 f"Received: input_shape={input_shape}")

        def call(self, x):
            return tf.nn.max_pool2d(x, 2, 2, "VALID")


    class NotALayer:
        pass


    def make_layer():
        return MyDense(4)
''')
# 2·M·K·N for the matmul and M·N for the bias add, at x [4, 8] and units=4.
MY_DENSE_FLOPS = 2 * 4 * 8 * 4 + 4 * 4
FAST = ["--repeats", "2", "--quiet", "--dtypes", "float32"]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A directory holding the user's layer module and two that fail to import.

    Imported once per session, as a user's module is: importing it again would
    define (and register for .keras files) a second set of its classes.
    """
    directory = tmp_path_factory.mktemp("user")
    (directory / f"{MODULE}.py").write_text(SOURCE)
    (directory / "fl_broken.py").write_text("raise RuntimeError('boom')\n")
    (directory / "fl_syntax.py").write_text("def f(:\n")
    sys.path.insert(0, str(directory))
    yield directory
    sys.path.remove(str(directory))


@pytest.fixture
def user(user_dir):
    __import__(MODULE)
    return sys.modules[MODULE]


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def auto_choice():
    return DEFAULT[(dispatch.cpu_platform(), "*")][0]


def test_bench_a_user_layer_end_to_end(capsys, tmp_path, user):
    path = tmp_path / "run.json"
    code, out, err = run_cli(
        capsys, "bench", "--layer", f"{MODULE}:MyDense", "--input-shape", "4,8",
        "--layer-args", '{"units": 4, "activation": "relu"}', "--json", str(path), *FAST)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["case", "mode", "provider", "dtype", "GFLOP/s", "%", "of",
                                "peak", "vs", "reference"]
    rows = lines[2:2 + len(cases.LAYER_PROVIDERS) * len(cases.MODES)]
    assert all(row.startswith(f"{MODULE}:MyDense 4x8 ") for row in rows)
    assert f"auto ({auto_choice()})" in out
    # No peak row in a layer suite: "-" for % of peak.
    assert all(row.split()[-2] == "-" for row in rows)
    assert lines[-3:-1] == [
        "FLOPs per call, counted by TensorFlow's op counter (tf.compat.v1.profiler, "
        "float_operation) on one traced call:",
        f"  {MODULE}:MyDense at 4x8: {MY_DENSE_FLOPS}",
    ]
    # auto against the fastest of reference, graph and xla, in each mode
    assert re.fullmatch(
        r"auto vs the fastest fixed implementation \(the median of round-by-round ratios\): "
        rf"\d+\.\d\dx to \d+\.\d\dx over 2 groups; lowest: {re.escape(MODULE)}:MyDense 4x8 "
        r"(function|eager) float32 against (reference|graph|xla)", lines[-1]), lines[-1]
    document = json.loads(path.read_text())
    assert document["settings"]["layer"] == {
        "name": f"{MODULE}:MyDense", "args": {"units": 4, "activation": "relu"},
        "input_shapes": [[4, 8]]}
    results = document["results"]
    assert {(r["provider"], r["mode"]) for r in results} == {
        (p, m) for p in cases.LAYER_PROVIDERS for m in cases.MODES}
    for row in results:
        assert row["error"] is None and row["gflops"] > 0
        assert (row["suite"], row["label"], row["shape"]) == (f"{MODULE}:MyDense", "4x8", {"B": 4})
        assert row["flops"] == MY_DENSE_FLOPS
        assert "tf.compat.v1.profiler" in row["flops_source"]
        assert row["fraction_of_peak"] is None and row["speedup_over_baseline"] > 0
        if row["provider"] == "reference":
            assert row["speedup_over_baseline"] == pytest.approx(1.0)
        assert (row["best_fixed_provider"] in ("reference", "graph", "xla")) == (row["provider"] == "auto")
    assert os.listdir(tmp_path) == ["run.json"]


@pytest.fixture(scope="module")
def exp_run(user_dir, tmp_path_factory):
    __import__(MODULE)
    path = tmp_path_factory.mktemp("exp") / "exp.json"
    argv = ["bench", "--layer", f"{MODULE}:Exp", "--input-shape", "4x8", "--modes",
            "function", "--json", str(path), *FAST]
    assert cli.main(argv) == 0
    return argv[:-len(FAST) - 2], json.loads(path.read_text())


def test_a_layer_with_no_counted_flops_reports_time_per_call(exp_run, capsys):
    argv, document = exp_run
    for row in document["results"]:
        assert row["flops"] == 0 and row["gflops"] is None and row["median_seconds"] > 0
    code, out, err = run_cli(capsys, *argv, *FAST)
    assert code == 0, err
    rows = out.splitlines()[2:2 + len(cases.LAYER_PROVIDERS)]
    assert all(re.search(r"  [0-9.]+ (ns|us|ms|s)/call  ", row) for row in rows), out
    assert out.splitlines()[-2] == (
        f"  {MODULE}:Exp at 4x8: none (no op it knows the FLOPs of), so time per call is "
        "shown instead of GFLOP/s")
    assert out.splitlines()[-1].startswith("auto vs the fastest fixed implementation")


def test_compare_uses_time_per_call_when_there_are_no_flops(exp_run, capsys, tmp_path):
    argv, document = exp_run
    for row in document["results"]:
        row["median_seconds"] /= 100  # the old run was 100x faster
    old = tmp_path / "old.json"
    old.write_text(json.dumps(document))
    code, out, err = run_cli(capsys, *argv, *FAST, "--compare", str(old),
                             "--fail-on-regression", "10")
    assert code == cli.EXIT_REGRESSION, err
    assert "regression over 10%" in err and f"{MODULE}:Exp" in err
    assert out.splitlines()[0].split()[-3:] == ["old", "GFLOP/s", "change"]
    for row in out.splitlines()[2:2 + len(cases.LAYER_PROVIDERS)]:
        assert re.search(r"/call +-9\d\.\d%$", row), row  # about 100x slower


def test_plot_of_a_layer_with_no_counted_flops_draws_time_per_call(user, tmp_path, monkeypatch):
    import matplotlib.figure

    drawn = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (drawn.append(fig), savefig(fig, *a, **k))[1])
    results = runner.bench_layer(user.Exp, (4, 8), sizes=[2, 4], modes=["function"],
                                 policies=["float32"], providers=["reference", "xla"], repeats=1)
    machine = {"cpu": "Test CPU", "cpu_count": 2, "onednn": False, "tensorflow": "2.21.0"}
    plot.plot(str(tmp_path / "p.png"), results, machine)
    ((ax,),) = [fig.axes for fig in drawn]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("batch size (first axis of the input)",
                                                  "time per call (ms)")
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[2, 4], [2, 4]]
    assert all(min(line.get_ydata()) > 0 for line in ax.get_lines())


def test_the_python_api_takes_a_class_and_a_plain_keras_layer(user):
    results = runner.bench_layer(user.Plain, (4, 8), layer_args={"units": 3},
                                 modes=["function"], policies=["mixed_bfloat16"], repeats=2)
    (result,) = results
    assert result.error is None and result.case.provider.name == "layer"
    assert result.case.suite.name == f"{MODULE}:Plain"
    assert result.case.flops == 2 * 4 * 8 * 3
    assert result.speedup_over_baseline == pytest.approx(1.0)
    assert report.table(results).splitlines()[0].split()[-2:] == ["vs", "layer"]


def test_a_built_in_by_name_with_two_inputs_and_a_batch_sweep():
    results = runner.bench_layer(
        "ResidualProjection", [(4, 6), (4, 3)], layer_args={"units": 3}, sizes=[2, 4],
        modes=["function"], policies=["float32"], providers=["auto", "reference"], repeats=2)
    assert [(r.case.size, r.case.provider.name) for r in results] == [
        (2, "auto"), (2, "reference"), (4, "auto"), (4, "reference")]
    assert [r.case.suite.label(r.case.shape) for r in results[::2]] == ["2x6, 2x3", "4x6, 4x3"]
    assert all(r.error is None and r.gflops > 0 for r in results)
    # The counted FLOPs grow with the batch: the op counter ran once per size.
    assert results[2].case.flops == 2 * results[0].case.flops


def test_a_suite_runs_beside_a_layer_and_the_table_names_each_baseline(capsys, tmp_path, user):
    path = tmp_path / "run.json"
    code, out, err = run_cli(
        capsys, "bench", "--suite", "matmul", "--sizes", "8", "--layer", f"{MODULE}:Exp",
        "--input-shape", "8,3", "--providers", "reference,keras", "--modes", "function",
        "--json", str(path), *FAST)
    assert code == 0, err
    rows = json.loads(path.read_text())["results"]
    # --providers picks from each suite the providers it has.
    assert [(r["suite"], r["provider"]) for r in rows] == [
        ("matmul", "keras"), (f"{MODULE}:Exp", "reference")]
    assert out.splitlines()[0].endswith("vs baseline")
    assert out.splitlines()[-1] == (
        f"vs baseline: speed-up over keras for matmul; reference for {MODULE}:Exp")
    # A suite that has none of the providers named is left out, not run whole.
    code, out, err = run_cli(
        capsys, "bench", "--suite", "matmul", "--sizes", "8", "--layer", f"{MODULE}:Exp",
        "--input-shape", "8,3", "--providers", "reference", "--modes", "function",
        "--json", str(path), *FAST)
    assert code == 0, err
    rows = json.loads(path.read_text())["results"]
    assert [(r["suite"], r["provider"]) for r in rows] == [(f"{MODULE}:Exp", "reference")]


def test_every_fastlayers_layer_has_a_defaults_row_that_builds():
    """Each row's arguments and shapes fit its layer (a symbolic call; nothing computed)."""
    assert sorted(layer_spec.LAYER_DEFAULTS) == layer_spec.builtin_names()
    for name in layer_spec.LAYER_DEFAULTS:
        spec = layer_spec.resolve_layer(name)
        assert spec.input_shapes == layer_spec.normalize_shapes(
            layer_spec.LAYER_DEFAULTS[name].input_shape)
    assert len(layer_spec.resolve_layer("ResidualProjection").input_shapes) == 2
    # Keras's alias names the same class, with the same defaults.
    alias = layer_spec.resolve_layer("MaxPool2D")
    assert (alias.name, alias.cls.__name__) == ("MaxPooling2D", "MaxPooling2D")
    assert "MaxPool2D" not in layer_spec.builtin_names()


@pytest.mark.parametrize("mode, implementation", [("function", "graph"), ("eager", "xla")])
def test_profile_a_user_layer_finds_its_scope(capsys, tmp_path, user, mode, implementation):
    logdir = tmp_path / "logs"
    code, out, err = run_cli(
        capsys, "profile", f"{MODULE}:MyDense", "--input-shape", "4,8", "--layer-args",
        '{"units": 4}', "--logdir", str(logdir), "--implementation", implementation,
        "--mode", mode, "--steps", "1")
    assert code == 0, err
    assert f"kernel scopes in the trace: fastlayers/my_dense/{implementation}" in out
    assert out.splitlines()[-1] == f"tensorboard --logdir {logdir}"


def test_profile_api_takes_a_class_and_a_built_in_with_two_inputs(tmp_path, user):
    result = profile.profile_layer(user.MyDense, str(tmp_path / "mine"), input_shape=(4, 8),
                                   layer_args={"units": 4}, steps=1)
    assert result.scopes == {f"fastlayers/my_dense/{auto_choice()}"}
    result = profile.profile_layer("ResidualProjection", str(tmp_path / "rp"),
                                   input_shape=[(4, 6), (4, 3)], layer_args={"units": 3},
                                   implementation="reference", steps=1)
    assert result.scopes == {"fastlayers/residual_projection/reference"}


# (command-line arguments after the command, message): each fails before anything runs.
BAD_INPUTS = [
    (["nope_module:X", "--input-shape", "4,8"],
     "cannot import module 'nope_module': ModuleNotFoundError: No module named 'nope_module'"),
    (["fl_broken:X", "--input-shape", "4,8"],
     "cannot import module 'fl_broken': RuntimeError: boom"),
    (["fl_syntax:X", "--input-shape", "4,8"], "cannot import module 'fl_syntax': SyntaxError: "),
    ([f"{MODULE}:Nope", "--input-shape", "4,8"], f"module '{MODULE}' has no attribute 'Nope'"),
    ([f"{MODULE}:NotALayer", "--input-shape", "4,8"],
     f"{MODULE}:NotALayer is not a Keras layer class (a keras.layers.Layer subclass); "
     "it is a class NotALayer"),
    ([f"{MODULE}:make_layer", "--input-shape", "4,8"], "it is a function"),
    ([":MyDense", "--input-shape", "4,8"], "expected a layer as module:Class"),
    (["Conv2D"], "unknown layer 'Conv2D'; fastlayers.layers has AttentionPooling, CenterZero, Dense"),
    ([f"{MODULE}:MyDense", "--input-shape", "4,8", "--layer-args", "{units: 4}"],
     "argument --layer-args: invalid JSON (Expecting property name enclosed in double quotes"),
    ([f"{MODULE}:MyDense", "--input-shape", "4,8", "--layer-args", "[4]"],
     "argument --layer-args: expected a JSON object of constructor arguments"),
    ([f"{MODULE}:Plain", "--input-shape", "4,8", "--layer-args", '{"unit": 4}'],
     f"{MODULE}:Plain rejected its arguments {{\"unit\": 4}}: TypeError: "
     "Plain.__init__() got an unexpected keyword argument 'unit'"),
    ([f"{MODULE}:MyDense", "--input-shape", "4,8", "--layer-args", '{"units": 4, "unit": 4}'],
     f"{MODULE}:MyDense rejected its arguments {{\"units\": 4, \"unit\": 4}}: ValueError: "
     "Unrecognized keyword arguments passed to MyDense: {'unit': 4}"),
    (["Dense", "--layer-args", '{"units": 0}'],
     "Dense rejected its arguments {\"units\": 0, \"activation\": \"relu\"}: ValueError: "
     "Received an invalid value for `units`, expected a positive integer"),
    ([f"{MODULE}:MyDense", "--input-shape", "4,8", "--layer-args",
      '{"units": 4, "dtype": "float16"}'],
     "`dtype` is not a layer argument here"),
    ([f"{MODULE}:MyDense", "--input-shape", "4,8", "--layer-args",
      '{"units": 4, "implementation": "xla"}'], "`implementation` is not a layer argument here"),
    ([f"{MODULE}:MyDense", "--layer-args", '{"units": 4}'],
     f"layer {MODULE}:MyDense is not a fastlayers layer with defaults: give its input shape"),
    ([f"{MODULE}:Pool2x2", "--input-shape", "4,8"],
     f"layer {MODULE}:Pool2x2 cannot take an input of shape (4, 8): ValueError: Pool2x2 "
     "expects a 4D input (batch, height, width, channels). Received: input_shape=(4, 8)"),
    (["ResidualProjection", "--input-shape", "4,6", "--layer-args", '{"units": 3}'],
     "layer ResidualProjection cannot take an input of shape (4, 6): ValueError: Layer "),
    ([f"{MODULE}:MyDense", "--input-shape", "4,0"], "invalid input dimension '0'"),
    ([f"{MODULE}:MyDense", "--input-shape", "4,8;"], "expected comma-separated dimensions"),
]


@pytest.mark.parametrize("command", ["bench", "profile"])
@pytest.mark.parametrize("argv, message", BAD_INPUTS,
                         ids=[a[0] + " " + m[:30] for a, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, user, command, argv, message):
    layer, rest = argv[0], argv[1:]
    if command == "bench":
        argv = ["bench", "--layer", layer, *rest, *FAST, "--json", str(tmp_path / "out.json")]
    else:
        argv = ["profile", layer, *rest, "--logdir", str(tmp_path / "logs")]
    code, out, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_USAGE, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"fastlayers {command}: error: ") and message in err, err
    assert "Traceback" not in err and out == ""
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--input-shape", "4,8"], "argument --input-shape: needs --layer or --model"),
        (["bench", "--layer-args", "{}"], "argument --layer-args: needs --layer"),
        (["profile", f"{MODULE}:Plain", "--input-shape", "4,8", "--implementation", "xla",
          "--logdir", "{tmp}/logs"],
         f"`--implementation xla` needs a fastlayers layer (a FastLayer or CompiledLayer); "
         f"{MODULE}:Plain is a plain Keras layer, profiled as it is"),
        (["bench", "--layer", f"{MODULE}:Plain", "--input-shape", "4,8", "--providers", "xla"],
         "argument --providers: unknown provider 'xla' for suite fl_user_layers:Plain "
         "(choose from layer)"),
    ],
    ids=["input shape alone", "layer args alone", "implementation of a plain layer",
         "provider of a plain layer"],
)
def test_options_that_need_a_fastlayers_layer_or_a_layer(capsys, tmp_path, user, argv, message):
    code, out, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == cli.EXIT_USAGE
    assert err == f"fastlayers {argv[0]}: error: {message}\n"
    assert out == "" and os.listdir(tmp_path) == []


def test_input_shapes_parse_one_or_several():
    assert layer_spec.parse_input_shape("64,128") == ((64, 128),)
    assert layer_spec.parse_input_shape("64x128") == ((64, 128),)
    assert layer_spec.parse_input_shape("8,64;8,32") == ((8, 64), (8, 32))
    with pytest.raises(ValueError, match=r"invalid input dimension '-1'"):
        layer_spec.parse_input_shape("8,-1")


def test_console_script_imports_a_layer_from_the_current_directory(user_dir):
    """The console script, run where the user's module is, with no PYTHONPATH."""
    script = shutil.which("fastlayers", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "fastlayers.bench.cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        command + ["bench", "--layer", f"{MODULE}:MyDense", "--input-shape", "4,8",
                   "--layer-args", '{"units": 4}', "--modes", "function", "--providers",
                   "reference,xla", *FAST],
        cwd=user_dir, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{MODULE}:MyDense 4x8  function  xla" in done.stdout
