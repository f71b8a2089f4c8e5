"""`fastlayers profile`: captured traces hold the kernel scopes, TensorBoard lists them,
and bad input is one line with nothing left behind."""

import contextlib
import glob
import gzip
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import keras
import pytest
from fastlayers import layers
from fastlayers.bench import cases, cli, layer_spec, profile
from fastlayers.kernels import dispatch
from fastlayers.kernels.dense import DENSE
from fastlayers.kernels.flops import dense_flops

TINY_SHAPE = (16, 8)
HOST = "127.0.0.1"


def expected_implementation(implementation, mode):
    if implementation is not None:
        return implementation
    # auto runs small eager calls with the reference (kernels/auto.py); in a graph,
    # the table decides
    units = layer_spec.LAYER_DEFAULTS["Dense"].args["units"]
    work = dense_flops(*TINY_SHAPE, units) if mode == "eager" else None
    return DENSE.select(None, platform=cases.platform_for("cpu"),
                        dtype=cases.compute_dtype("float32"), work=work).implementation


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """One capture per mode and implementation, each in its own log directory."""
    results = {}
    for mode in cases.MODES:
        for implementation in (None, "reference", "graph", "xla"):
            logdir = tmp_path_factory.mktemp(f"{mode}-{implementation}")
            results[mode, implementation] = profile.profile_layer(
                "Dense", str(logdir), input_shape=TINY_SHAPE, implementation=implementation,
                mode=mode, steps=2)
    return results


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("implementation", [None, "reference", "graph", "xla"])
def test_trace_holds_the_kernel_scope(captures, mode, implementation):
    result = captures[mode, implementation]
    assert os.path.isfile(result.xplane_path)
    assert result.run == "Dense"
    assert result.xplane_path.startswith(
        os.path.join(result.logdir, "Dense", "plugins", "profile", ""))
    assert result.scopes == {f"fastlayers/dense/{expected_implementation(implementation, mode)}"}


def test_the_cli_offers_every_implementation():
    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["profile"]._actions
                  if a.dest == "implementation")
    assert tuple(action.choices) == ("auto", *dispatch.ALL_IMPLEMENTATIONS)


@pytest.mark.parametrize("mode", cases.MODES)
def test_native_attention_has_its_scope(tmp_path, mode):
    result = profile.profile_layer(
        "MultiHeadAttention", str(tmp_path), implementation="native", mode=mode, steps=1)
    assert "fastlayers/dot_product_attention/native" in result.scopes


def trace_viewer_events(xplane_path):
    """The trace viewer's events for a capture, through xprof's own converter."""
    from xprof.convert import raw_to_tool_data

    data, content_type = raw_to_tool_data.xspace_to_tool_data(
        [xplane_path], "trace_viewer", {})
    assert content_type == "application/json"
    return json.loads(data)["traceEvents"]


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("implementation", ["reference", "graph", "xla"])
def test_trace_viewer_finds_the_scope(captures, mode, implementation):
    """What a user finds by searching the trace viewer for the kernel's scope: the
    profiler Trace event of an eager call; in a tf.function, the op names it prefixes,
    of the ops a graph runs (`long_name`) or of the op that launches the XLA cluster
    (`name`). XLA's ops also carry the kernel's function name as their program name."""
    scope = dispatch.scope_name("dense", implementation)
    events = trace_viewer_events(captures[mode, implementation].xplane_path)
    if mode == "eager":
        found = [e for e in events if e.get("name") == scope]
    else:
        arg = "name" if implementation == "xla" else "long_name"
        found = [e for e in events if f"/{scope}/" in e.get("args", {}).get(arg, "")]
    assert found, f"{scope} in none of {len(events)} trace viewer events"
    assert all(e.get("ph") in ("X", "i", "I", "B", "E", "s", "f", "t") for e in found)
    if implementation == "xla":
        program = dispatch.function_name("dense", "xla")
        assert any(program in e.get("args", {}).get("hlo_module", "") for e in events), (
            f"{program} is the program of none of {len(events)} trace viewer events")


def test_profile_api_takes_a_model(tmp_path):
    model = keras.Sequential([keras.Input((8,)), layers.Dense(4, implementation="graph"),
                              layers.Linear(2, implementation="reference")])
    result = profile.profile_layer(model, str(tmp_path), input_shape=(16, 8), steps=1)
    assert result.scopes == {"fastlayers/dense/graph", "fastlayers/dense/reference"}


def test_cli_prints_the_tensorboard_line(tmp_path):
    # In a fresh process, as from the shell: a capture in a process that had already
    # run other test files has been seen to lose the event of the op that launches the
    # XLA cluster, the one event of a function-mode XLA call that holds the scope.
    logdir = tmp_path / "logs"
    argv = ["profile", "Linear", "--logdir", str(logdir), "--input-shape", "16,8",
            "--implementation", "xla", "--mode", "function", "--steps", "1"]
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from fastlayers.bench import cli; sys.exit(cli.main(sys.argv[1:]))",
         *argv], capture_output=True, text=True, timeout=300, check=False,
    )
    code, out, err = done.returncode, done.stdout, done.stderr
    assert code == 0, err
    assert out.splitlines()[-1] == f"tensorboard --logdir {logdir}"
    assert "kernel scopes in the trace: fastlayers/dense/xla" in out
    assert glob.glob(str(logdir / "Linear" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_xla_program_name_gives_the_scope_when_the_launch_event_is_lost(captures, tmp_path, monkeypatch):
    """On a loaded machine the profiler has dropped the event of the op that launches
    the XLA cluster; the XLA ops' program name still names the kernel."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(captures["function", "xla"].xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    programs = 0
    for plane in space.planes:
        for metadata in plane.stat_metadata.values():
            if "fastlayers/" in metadata.name:
                metadata.name = "dropped"
            programs += dispatch.function_name("dense", "xla") in metadata.name
    assert programs
    stripped = tmp_path / "stripped.xplane.pb"
    stripped.write_bytes(space.SerializeToString())
    assert profile.trace_scopes(str(stripped)) == {"fastlayers/dense/xla"}
    # What SCOPE_PATTERN alone finds: the scope in the capture, nothing once stripped,
    # so the program name is what gave it above.
    with monkeypatch.context() as patch:
        patch.setattr(profile, "FUNCTION_PATTERN", re.compile(r"(?!)"))  # matches nothing
        assert profile.trace_scopes(captures["function", "xla"].xplane_path) == {"fastlayers/dense/xla"}
        assert profile.trace_scopes(str(stripped)) == set()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["Conv2D", "--logdir", "{tmp}/logs"], "unknown layer 'Conv2D'; fastlayers.layers has"),
        (["Dense", "--logdir", "{tmp}/a-file/logs"], "cannot be created"),
        (["Dense", "--logdir", "{tmp}/a-file"], "exists and is not a directory"),
        (["Dense", "--logdir", "{tmp}/logs", "--input-shape", "8"], "cannot take an input"),
        (["Dense", "--logdir", "{tmp}/logs", "--input-shape", "8,0"], "invalid input dimension"),
        (["Dense", "--logdir", "{tmp}/logs", "--dtype", "int8"], "invalid choice: 'int8'"),
    ],
    ids=["unknown layer", "logdir under a file", "logdir is a file", "rank-1 input",
         "zero dimension", "unknown dtype"],
)
def test_bad_input_is_one_line_and_leaves_nothing(capsys, tmp_path, argv, message):
    (tmp_path / "a-file").write_text("x")
    before = sorted(os.listdir(tmp_path))
    code = cli.main(["profile"] + [arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("fastlayers profile: error: ") and message in err
    assert "Traceback" not in err and out == ""
    assert sorted(os.listdir(tmp_path)) == before


def free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get_json(port, route, timeout=5):
    with urllib.request.urlopen(f"http://{HOST}:{port}{route}", timeout=timeout) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return json.loads(body)


def test_tensorboard_lists_each_layer_as_a_run_of_its_name(captures):
    """Dense and Linear captured into one log directory are two runs, by class name."""
    dense = captures["eager", None]
    linear = profile.profile_layer("Linear", dense.logdir, input_shape=TINY_SHAPE, steps=1)
    assert (dense.run, linear.run) == ("Dense", "Linear")
    # The profile plugin names a capture <run>/<session>.
    expected = [f"{result.run}/{os.path.basename(result.run_dir)}" for result in (dense, linear)]
    run = expected[0]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", dense.logdir,
         "--host", HOST, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline, runs, error = time.monotonic() + 120, None, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                # xprof's profile plugin: /data/plugin/profile/runs lists profile runs.
                runs = get_json(port, "/data/plugin/profile/runs")
                if all(name in runs for name in expected):
                    break
            except OSError as e:
                error = e
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read()[-2000:]
        assert runs is not None and all(name in runs for name in expected), (
            f"runs={runs}, last error={error}")
        assert "profile" in get_json(port, "/data/plugins_listing")
        tools = get_json(port, "/data/plugin/profile/run_tools?run=" + urllib.parse.quote(run),
                         timeout=60)
        assert any(tool.startswith("trace_viewer") for tool in tools), tools
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
        server.stderr.close()
