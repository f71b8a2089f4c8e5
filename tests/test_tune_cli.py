"""`fastlayers tune`: end to end on tiny sizes, the table and --json, and one-line errors."""

import json

import pytest

from fastlayers.bench import cli
from fastlayers.kernels import tuning


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(directory))
    tuning.reset()
    yield directory
    tuning.reset()


def run_cli(capsys, *argv):
    code = cli.main(["tune", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tune_a_suite_writes_the_cache_and_prints_each_choice(capsys, cache_dir, tmp_path):
    from fastlayers.bench import cases

    note = cases.DENSE.provider("fastlayers").note
    assert note(cases.DENSE.shape(8), "float32", "cpu").endswith(", table")
    path = tmp_path / "choices.json"
    code, out, err = run_cli(capsys, "--suite", "dense", "--sizes", "8", "--dtypes", "float32",
                             "--budget", "1", "--quiet", "--json", str(path))
    assert code == 0, err
    header, row = out.strip().splitlines()
    assert header.split()[:5] == ["case", "kernel", "dtype", "mode", "choice"]
    assert row.startswith("dense 8x1024 -> 4096") and " dense " in row and row.endswith("x")
    [cache_file] = cache_dir.glob("tuning-*.json")
    records = json.loads(cache_file.read_text())["records"]
    [choice] = json.loads(path.read_text())["choices"]
    assert choice["kernel"] == "dense" and choice["record"] in records.values()
    assert choice["over_table"] >= 1.0 - tuning.TIE  # never worse than the table beyond a tie
    # a new process's auto now takes it
    import keras
    import tensorflow as tf

    from fastlayers import kernels
    from fastlayers.kernels.dense import DENSE

    tuning.reset()
    selection = DENSE.select(
        None, platform=kernels.platform_of(tf.zeros([1])), dtype=tf.float32, tensors=(tf.zeros([8, 1024]), tf.zeros([1024, 4096]), tf.zeros([4096])),
        activation=keras.activations.relu,
    )
    assert (selection.label, selection.source) == (choice["choice"], "tuned")
    # and bench says so
    assert note(cases.DENSE.shape(8), "float32", "cpu") == f"auto: {choice['choice']}, tuned"


def test_tune_a_layer(capsys, cache_dir):
    code, out, err = run_cli(capsys, "--layer", "Exponential", "--input-shape", "4,8",
                             "--dtypes", "float32", "--modes", "eager", "--budget", "0.5", "--quiet")
    assert code == 0, err
    assert "exponential" in out and "Exponential" in out


@pytest.mark.parametrize("argv, message", [
    (["--suite", "nope"], "argument --suite: unknown suite 'nope'"),
    (["--dtypes", "float8"], "argument --dtypes: unknown dtype policy 'float8'"),
    (["--input-shape", "4,8"], "argument --input-shape: needs --layer or --model"),
    (["--layer", "Dense", "--model", "m.keras"], "argument --model: not allowed with --layer"),
    (["--model", "missing.keras", "--input-shape", "4,8"], "argument --model: no such file 'missing.keras'"),
    (["--model", "missing.keras"], "argument --model: needs --input-shape"),
    (["--budget", "0"], "argument --budget: expected a positive number of seconds"),
])
def test_bad_options_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_USAGE
    assert err.strip().count("\n") == 0 and message in err, err


def test_an_unwritable_cache_is_one_line(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(blocker / "cache"))
    code, out, err = run_cli(capsys, "--sizes", "8", "--quiet")
    assert code == cli.EXIT_USAGE
    assert err.startswith("fastlayers tune: error: cannot write the tuning cache in ")
    assert tuning.CACHE_DIR_ENV in err and err.strip().count("\n") == 0


def test_tune_a_saved_model_tunes_every_kernel_call_it_makes(capsys, tmp_path):
    import keras

    from fastlayers import layers

    inputs = keras.Input((8,))
    outputs = layers.Exponential()(layers.Dense(16)(inputs))
    path = tmp_path / "model.keras"
    keras.Model(inputs, outputs).save(path)
    code, out, err = run_cli(capsys, "--model", str(path), "--input-shape", "4,8",
                             "--modes", "eager", "--budget", "0.5", "--quiet")
    assert code == 0, err
    kernels_tuned = [line.split("  ")[1].strip() for line in out.strip().splitlines()[1:]]
    assert kernels_tuned == ["dense", "exponential"]
