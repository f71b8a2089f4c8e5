"""The library apart from its tooling: what installing and importing fastlayers brings in.

The library (kernels, layers, testing helpers) needs TensorFlow, Keras, numpy and
ml-dtypes; benchmarks, plots and profiles take the `bench` extra, the test suite
the `test` extra. Modules import one way: layers -> kernels; bench -> both.
"""

import ast
import configparser
import os
import pathlib
import re
import subprocess
import sys

import pytest
from fastlayers.bench import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOLING_ONLY = ("pytest", "_pytest", "pytest_benchmark", "matplotlib", "tqdm", "hypothesis",
                "xdist")


def _requirements(text):
    return {re.match(r"[A-Za-z0-9._-]+", line.strip()).group(0).lower()
            for line in text.strip().splitlines() if line.strip()}


@pytest.fixture(scope="module")
def setup_cfg():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def test_the_library_requires_only_what_the_kernels_need(setup_cfg):
    assert _requirements(setup_cfg["options"]["install_requires"]) == {
        "tensorflow", "keras", "numpy", "ml-dtypes"}


def test_the_bench_extra_has_the_tooling_and_the_test_extra_holds_it(setup_cfg):
    extras = setup_cfg["options.extras_require"]
    bench = _requirements(extras["bench"])
    assert bench == {"pytest", "pytest-benchmark", "tensorboard", "tensorboard-plugin-profile",
                     "matplotlib", "tqdm"}
    test_lines = {line.strip() for line in extras["test"].splitlines() if line.strip()}
    bench_lines = {line.strip() for line in extras["bench"].splitlines() if line.strip()}
    assert bench_lines <= test_lines, "the test extra pins bench's packages differently"
    assert _requirements(extras["test"]) - bench == {"hypothesis", "pytest-xdist", "simde-py"}


# Blocks the tooling packages as if they were not installed (Keras imports matplotlib
# when it finds it), imports the library and the bench modules the CLI runs, and prints
# what got imported anyway.
IMPORT_WITHOUT_TOOLING = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import fastlayers.layers, fastlayers.kernels, fastlayers.testing
from fastlayers.bench import cases, cli, files, layer_spec, machine, profile, report, runner
loaded = sorted(name for name in sys.modules
                if name.split(".")[0] in {blocked!r} and sys.modules[name] is not None)
print("loaded:", loaded)
"""


def test_the_library_and_the_cli_import_without_pytest_matplotlib_or_tqdm():
    code = IMPORT_WITHOUT_TOOLING.format(blocked=TOOLING_ONLY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded: []"


def test_bench_without_its_extra_is_one_line_naming_the_install(monkeypatch, capsys):
    assert cli.missing_packages("bench") == []  # this environment has the extra
    installed = cli._version
    monkeypatch.setattr(cli, "_version", lambda name: None if name == "tqdm" else installed(name))
    assert cli.missing_packages("bench") == ["tqdm"]
    for command in (["bench"], ["profile", "Dense", "--logdir", "logs"]):
        assert cli.main(command) == cli.EXIT_USAGE
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (f"fastlayers {command[0]}: error: needs the bench extra (tqdm not "
                       'installed): pip install "fastlayers[bench]"\n')


def _fastlayers_imports(path, package):
    """The fastlayers modules a source file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "fastlayers"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastlayers")}
    return {name for name in found if name.startswith(package)}


def _modules(folder, package):
    return {f"{package}.{path.stem}": path for path in sorted((ROOT / folder).glob("*.py"))
            if path.stem != "__init__" and not path.stem.startswith(("test_", "conftest"))}


def test_the_bench_modules_import_each_other_without_a_cycle():
    modules = _modules("bench", "fastlayers.bench")
    edges = {name: {m for m in _fastlayers_imports(path, "fastlayers.bench.") if m in modules}
             for name, path in modules.items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for other in sorted(edges[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(modules):
        visit(name)


@pytest.mark.parametrize("folder, forbidden", [
    ("kernels", ("fastlayers.layers", "fastlayers.bench", "fastlayers.testing")),
    ("layers", ("fastlayers.bench", "fastlayers.testing")),
    ("testing", ("fastlayers.bench",)),
])
def test_data_flows_one_way(folder, forbidden):
    for path in sorted((ROOT / folder).glob("*.py")):
        imported = _fastlayers_imports(path, "fastlayers")
        wrong = sorted(m for m in imported if m.startswith(forbidden))
        assert not wrong, f"{folder}/{path.name} imports {wrong}"
