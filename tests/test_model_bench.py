"""`fastlayers bench --model FILE.keras`: a small model against its accelerated copy."""

import re

import keras
import pytest
from fastlayers.bench import cli, model_bench


def _small_model(path, *, compiled=False):
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(10, 8)(tokens)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, keras.layers.Dense(3, activation="softmax")(x), name="small")
    if compiled:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.save(path)
    return path


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("compiled", [False, True])
def test_bench_model_prints_both_steps_and_the_speedup(compiled, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_bench.runner, "MIN_SAMPLE_SECONDS", 0.0)
    path = _small_model(tmp_path / "small.keras", compiled=compiled)
    code, out, err = run_cli(capsys, "bench", "--model", str(path), "--input-shape", "4,6",
                             "--repeats", "2", "--quiet")
    assert code == 0, err
    assert "accelerate('small'): 3 of" in out  # LayerNormalization, MultiHeadAttention, Dense
    assert "model 'small', input 4x6" in out
    for step in ("predict", "train step"):
        line = next(line for line in out.splitlines() if line.startswith(step))
        original, accelerated, speedup = line[len(step):].split("ms")
        assert float(original) > 0 and float(accelerated) > 0
        assert float(speedup.strip().rstrip("x")) == pytest.approx(
            float(original) / float(accelerated), rel=0.02)
    assert "fastlayers bench --model on" in err


def test_bench_model_in_python_leaves_the_model_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(model_bench.runner, "MIN_SAMPLE_SECONDS", 0.0)
    model = keras.saving.load_model(_small_model(tmp_path / "small.keras"))
    weights = model.get_weights()
    results = model_bench.bench_model(model, repeats=1, verbose=False)
    assert [r.step for r in results] == list(model_bench.STEPS)
    assert all(r.original > 0 and r.accelerated > 0 for r in results)
    for kept, before in zip(model.get_weights(), weights):
        assert (kept == before).all()
    assert not model.compiled


@pytest.mark.parametrize("argv,message", [
    (["--model", "missing.keras"], r"cannot load missing.keras"),
    (["--model", "model.h5"], r"expected a .keras file"),
    (["--model", "{small}", "--input-shape", "4,7"], r"input shape \(4, 7\) does not fit model "
     r"input .* of shape \(None, 6\)"),
    (["--model", "{small}", "--input-shape", "4,6;4,6"], r"has 1 input\(s\); --input-shape gave 2"),
    (["--model", "{small}", "--layer", "Dense"], r"does not take --layer"),
])
def test_bad_model_options_are_one_line_errors(argv, message, tmp_path, capsys):
    small = str(_small_model(tmp_path / "small.keras"))
    code, _, err = run_cli(capsys, "bench", *[a.format(small=small) for a in argv])
    assert code == cli.EXIT_USAGE
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("fastlayers bench: error: ")
    assert re.search(message, err), err


def test_input_shape_needs_layer_or_model(capsys):
    code, _, err = run_cli(capsys, "bench", "--input-shape", "4,6")
    assert code == cli.EXIT_USAGE
    assert "argument --input-shape: needs --layer or --model" in err


def test_a_model_with_unknown_sizes_asks_for_its_input_shape(tmp_path):
    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(model_bench.ModelError, match=r"give its size with --input-shape"):
        model_bench.input_shapes(model)
