"""The README stays true: its two commands, CI's command, every Python example and command."""

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
    assert commands == [
        'python3 -m venv .venv && .venv/bin/pip install ".[bench]" && .venv/bin/fastlayers bench',
        'python3 -m venv .venv && .venv/bin/pip install ".[test]" && '
        ".venv/bin/pytest -n 2 --dist loadfile",
    ]


def test_ci_runs_the_readmes_test_command():
    test_command = _blocks("sh")[0].splitlines()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def _sections():
    """``(title, body)`` of each ``## `` section, in order."""
    parts = re.split(r"^## (.+)\n", README, flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def test_every_python_example_runs_in_its_section_as_written(tmp_path, monkeypatch, capsys):
    """Each section's blocks run in order in a fresh namespace, as a reader who jumps
    to that section would paste them: a block may use only its own section's names."""
    monkeypatch.chdir(tmp_path)
    ran = []
    for title, body in _sections():
        namespace = {}
        for block in re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M):
            exec(compile(block, f"README.md, {title}", "exec"), namespace)
            ran.append(title)
    assert {"Use", "Bring your own layer", "Scaling out"} <= set(ran)
    printed = capsys.readouterr().out.splitlines()
    # What the README's comments say the walkthrough prints.
    assert "(32, 64) 64" in printed
    assert "['fastlayers/my_dense/xla']" in printed
    assert not list(tmp_path.glob("*.keras")), "an example left a .keras file behind"


SHELL_STARTS = ("python3 -m venv .venv && .venv/bin/pip install ", ".venv/bin/")


def test_every_command_runs_as_given_after_the_first():
    """No command needs an activated venv: each names `.venv/bin/` (or creates it)."""
    for block in _blocks("sh"):
        for line in block.splitlines():
            if line.strip():
                assert line.startswith(SHELL_STARTS), line
    inline = re.findall(r"`((?:fastlayers|pytest|tensorboard|pip) [^`]*)`", README)
    assert not inline, f"commands not on PATH after the first command: {inline}"


def test_the_profiling_commands_write_a_run_named_after_the_layer(tmp_path, monkeypatch, capsys):
    (block,) = re.findall(r"^```sh\n(.*?)^```", _section("Profiling"), flags=re.S | re.M)
    profile_command, tensorboard_command = [shlex.split(line) for line in block.splitlines()]
    assert profile_command[:2] == [".venv/bin/fastlayers", "profile"]
    logdir = profile_command[profile_command.index("--logdir") + 1]
    assert tensorboard_command == [".venv/bin/tensorboard", "--logdir", logdir]
    monkeypatch.chdir(tmp_path)
    # A smaller Dense than its LAYER_DEFAULTS row, one step: the command, not the size.
    argv = profile_command[1:] + ["--input-shape", "8,16", "--layer-args", '{"units": 8}',
                                  "--steps", "1"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.splitlines()[-1] == f"tensorboard --logdir {logdir}"
    assert list((tmp_path / logdir / "Dense" / "plugins" / "profile").glob("*/*.xplane.pb"))


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
    assert [c[:2] for c in commands] == [[".venv/bin/fastlayers", "bench"],
                                         [".venv/bin/fastlayers", "profile"]]
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
