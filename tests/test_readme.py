"""The README stays true: its two commands, CI's command, and every Python example."""

import pathlib
import re

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


def test_every_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)
