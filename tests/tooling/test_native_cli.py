"""`fastlayers build` and the torch-sdpa peer row of the attention benchmarks."""

import json

import numpy as np
import pytest

from fastlayers.bench import cases, cli, peers
from fastlayers.kernels.native import attention as native_attention
from fastlayers.kernels.native import build as build_lib


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_prints_the_library_and_its_isa(capsys):
    code, out, err = run_cli(capsys, "build")
    assert code == 0, err
    lines = out.splitlines()
    path = build_lib.plan().library
    assert lines[0] in (f"built: {path}", f"cached: {path}")
    assert lines[1].startswith("compiler: ")
    assert lines[2] == f"instruction set: {native_attention.build_status()[1]}"
    # Built once: the next run reuses it.
    code, out, _ = run_cli(capsys, "build")
    assert code == 0 and out.splitlines()[0] == f"cached: {path}"


def test_build_without_a_compiler_fails_with_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLAYERS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    code, out, err = run_cli(capsys, "build")
    assert code == 1 and out == ""
    assert err == "fastlayers build: error: no C++ compiler: CXX='no-such-compiler' is not an executable on PATH\n"


def test_torch_sdpa_row_is_listed_exactly_where_torch_is_installed():
    names = cases.ATTENTION.provider_names
    assert ("torch-sdpa" in names) == peers.torch_available()
    assert "fastlayers-native" in names
    assert "fastlayers-native" not in cases.DENSE.provider_names


def test_torch_sdpa_row_beside_the_native_one(capsys, tmp_path):
    pytest.importorskip("torch", reason="the peers extra is not installed")
    path = tmp_path / "run.json"
    code, out, err = run_cli(capsys, "bench", "--suite", "attention", "--sizes", "64",
                             "--repeats", "2", "--quiet", "--dtypes", "float32,mixed_bfloat16",
                             "--providers", "fastlayers-native,torch-sdpa,keras",
                             "--json", str(path))
    assert code == 0, err
    assert f"torch-sdpa ({peers.torch_threads()} threads)" in out
    rows = json.loads(path.read_text())["results"]
    torch_rows = [row for row in rows if row["provider"] == "torch-sdpa"]
    assert len(torch_rows) == 4  # two dtypes, eager and function mode
    assert all(row["error"] is None and row["gflops"] > 0 for row in torch_rows)


def test_torch_sdpa_step_computes_attention():
    torch = pytest.importorskip("torch", reason="the peers extra is not installed")

    shape = {"B": 1, "T": 5, "S": 7, "N": 2, "H": 8}
    out = peers.torch_sdpa(backward=False)(shape, "float32")()
    assert tuple(out.shape) == (1, 2, 5, 8) and out.dtype == torch.float32
    grads = peers.torch_sdpa(backward=True)(shape, "mixed_bfloat16")()
    assert [tuple(g.shape) for g in grads] == [(1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)]
    assert all(np.isfinite(g.float().numpy()).all() for g in grads)
