"""The README stays true: its two commands, CI's command, and every Python example."""

import pathlib
import re
import shlex
import sys

import pytest
from fastlayers.bench import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_the_readme_opens_with_exactly_two_commands():
    first = README.index("```")
    assert README[first:].startswith("```sh\n")
    commands = [line for line in _blocks("sh")[0].splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert commands[0].endswith("fastlayers bench")
    assert ".venv/bin/pytest" in commands[1]


def test_ci_runs_the_readmes_test_command():
    test_command = _blocks("sh")[0].splitlines()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_every_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    # What the README's comments say the walkthrough prints.
    assert "(32, 64) 64" in printed
    assert "['fastlayers/my_dense/xla']" in printed


def _section(title):
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def test_the_walkthroughs_shell_commands_run_on_its_module(tmp_path, monkeypatch, capsys):
    """`my_layers.py` holds the walkthrough's class; its two commands run, on smaller shapes."""
    section = _section("Bring your own layer")
    (module,) = [b for b in re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
                 if "class MyDense" in b]
    (tmp_path / "my_layers.py").write_text(module)
    lead = "From the shell, with the class saved in `my_layers.py`:"
    commands = re.search(re.escape(lead) + r"\s*```sh\n(.*?)^```", section, re.S | re.M).group(1)
    commands = [shlex.split(line) for line in commands.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["fastlayers", "bench"], ["fastlayers", "profile"]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_layers", raising=False)
    smaller = {"2048,1024": "8,16", '"units": 4096': '"units": 8'}
    for command in commands:
        argv = [_replace_all(arg, smaller) for arg in command[1:]]
        if argv[0] == "bench":
            argv += ["--repeats", "1", "--quiet"]
        else:
            argv += ["--steps", "1"]
        assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "my_layers:MyDense 8x16" in out
    assert "kernel scopes in the trace: fastlayers/my_dense/" in out
    assert list((tmp_path / "logs" / "MyDense" / "plugins" / "profile").glob("*/*.xplane.pb"))
    sys.modules.pop("my_layers", None)


def _replace_all(text, replacements):
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("command, mentions", [
    ("bench", ["--layer LAYER", "module:Class", "--input-shape"]),
    ("profile", ["module:Class", "--input-shape", "--logdir"]),
])
def test_each_command_explains_itself(command, mentions, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastlayers {command}")
    for mention in mentions:
        assert mention in out
