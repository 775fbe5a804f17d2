"""sparsify(fuse_activations=True) rewriting blocks' forward with torch.fx: ResNet's residual add and shared ReLU
move into the sparse convolution; only provable chains fuse; checkpoints record and redo the rewrite."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, resnet18

from checkpoint_tools import assert_load_refused, rewrite
from conftest import relative_error
from pysparse import fold_batchnorm, load, save, sparsify
from pysparse.bench.sweep import block_mask
from pysparse.nn import SparseConv2d


def _prune_convs_(model: nn.Module, seed: int = 0) -> nn.Module:
    """90% of the 32x32 blocks of every conv with >= 32 input channels dropped; BatchNorm statistics randomised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.in_channels >= 32:
                o, i, kh, kw = m.weight.shape
                mask = block_mask(o, kh * kw * i, (32, 32), 0.9, g)
                m.weight.mul_(mask.reshape(o, kh, kw, i).permute(0, 3, 1, 2))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def _bottlenecks(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    down = nn.Sequential(nn.Conv2d(64, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))
    return _prune_convs_(nn.Sequential(Bottleneck(64, 32, stride=2, downsample=down), Bottleneck(128, 32)), seed)


def _fused(model, x):
    with torch.no_grad():
        folded = fold_batchnorm(model)
        sparse = sparsify(model, fold_batchnorm=True, fuse_activations=True)
        assert relative_error(sparse(x), folded(x).double()) < 1e-5
    return sparse


def test_bottleneck_residual_and_relus_fuse():
    x = torch.randn(2, 64, 12, 12)
    sparse = _fused(_bottlenecks(), x)
    for block in sparse:
        assert isinstance(block, fx.GraphModule) and type(block).__name__ == "Bottleneck"
        assert (block.conv1.activation, block.conv2.activation, block.conv3.activation) == ("relu",) * 3
        assert "residual" in block.code and "relu" not in block.code.replace("conv", "")
    report = {r.name: r for r in sparse.sparsify_report.layers}
    assert report["0.conv3"].fused_residual and report["0.conv3"].fused_activation == "relu"
    assert not report["0.conv1"].fused_residual and report["0.conv1"].fused_activation == "relu"
    assert "rewritten with torch.fx" in report["1.conv3"].reason


def test_resnet18_basic_blocks_fuse():
    model = _prune_convs_(resnet18(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    sparse = _fused(model, x)
    fused = [r for r in sparse.sparsify_report.layers if r.fused_residual]
    # conv2 of every BasicBlock whose input has >= 32 channels (all 8) adds the block's identity
    assert sorted(r.name for r in fused) == sorted(f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2))


def test_rewritten_model_compiles():
    x = torch.randn(2, 64, 12, 12)
    sparse = _fused(_bottlenecks(), x)
    torch._dynamo.reset()
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), sparse(x).double()) < 1e-6


class _Block(nn.Module):
    """conv -> add(identity) -> relu, in several spellings."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "functional":
            return F.relu(y + x)
        if self.kind == "module":
            return self.relu(y + x)
        if self.kind == "no_activation":
            return x + y
        if self.kind == "method":
            return (y + x).relu()
        if self.kind == "alpha":             # not a plain add: left alone
            return self.relu(torch.add(y, x, alpha=2.0))
        if self.kind == "self_residual":     # the other operand depends on the conv: left alone
            return self.relu(y + y * 2)
        if self.kind == "twice":             # add(y, y): no residual to take
            return self.relu(y + y)
        if self.kind == "mul":               # a product is not a residual
            return self.relu(y * x)
        if self.kind == "read_twice":        # the conv output is read again: left alone
            return self.relu(y + x) + y
        if self.kind == "tanh_gelu":         # tanh GELU is not the fused (exact) one: only the add fuses
            return F.gelu(y + x, approximate="tanh")
        if self.kind == "untraceable":       # data-dependent control flow: fx cannot trace, left alone
            return self.relu(y + x) if bool(x.sum() > 0) else y
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind, activation, residual", [
    ("functional", "relu", True), ("module", "relu", True), ("no_activation", None, True), ("method", "relu", True),
    ("alpha", None, False), ("self_residual", None, False), ("twice", None, False), ("mul", None, False),
    ("read_twice", None, False),
    ("tanh_gelu", None, True), ("untraceable", None, False),
])
def test_only_provable_chains_fuse(kind, activation, residual):
    torch.manual_seed(3)
    model = _prune_convs_(nn.Sequential(_Block(kind)))
    x = torch.randn(2, 64, 9, 9)
    sparse = _fused(model, x)
    conv = sparse[0].conv
    assert isinstance(conv, SparseConv2d)
    assert (conv.activation, sparse.sparsify_report.layers[0].fused_residual) == (activation, residual)
    assert isinstance(sparse[0], fx.GraphModule) == (activation is not None or residual)


def test_hooks_block_fusion():
    """A hook on the block keeps its forward; a hook on the activation keeps the activation out of the layer."""
    torch.manual_seed(4)
    model = _prune_convs_(nn.Sequential(_Block("module")))
    model[0].register_forward_hook(lambda *a: None)
    sparse = sparsify(model, fuse_activations=True)
    assert not isinstance(sparse[0], fx.GraphModule) and sparse[0].conv.activation is None
    model = _prune_convs_(nn.Sequential(_Block("module")))
    model[0].relu.register_forward_hook(lambda *a: None)
    sparse = sparsify(model, fuse_activations=True)
    assert isinstance(sparse[0], fx.GraphModule) and sparse[0].conv.activation is None
    assert sparse.sparsify_report.layers[0].fused_residual


def test_checkpoint_redoes_the_rewrite(tmp_path):
    x = torch.randn(2, 64, 12, 12)
    sparse = _fused(_bottlenecks(), x)
    path = tmp_path / "resnet.safetensors"
    save(sparse, path)
    fresh = load(fold_batchnorm(_bottlenecks(seed=7)), path)   # other weights: all come from the file
    assert all(isinstance(b, fx.GraphModule) for b in fresh) and fresh[0].conv3.activation == "relu"
    with torch.no_grad():
        assert torch.equal(fresh(x), sparse(x))
    # A reader that ignores the record loads the layers unfused: the blocks' own forward completes them.
    plain = rewrite(path, tmp_path / "plain.safetensors", edit_meta=lambda m: m.pop("forward_fusions") and None)
    unfused = load(fold_batchnorm(_bottlenecks(seed=7)), plain)
    assert not isinstance(unfused[0], fx.GraphModule) and unfused[0].conv3.activation is None
    with torch.no_grad():
        assert relative_error(unfused(x), sparse(x).double()) < 1e-6


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(forward_fusions=[1]), "'forward_fusions' must be an object"),
    (lambda m: m["forward_fusions"]["0"][0].update(activation="swish"), "must list its fusions"),
    (lambda m: m["forward_fusions"]["0"][0].pop("residual"), "must list its fusions"),
    (lambda m: m["forward_fusions"].update({"5": m["forward_fusions"]["0"]}), "block '5' is not in the model"),
    (lambda m: m["forward_fusions"]["0"].pop() and None, "fuses .* in this model, the file recorded"),
    (lambda m: m["forward_fusions"]["0"][2].update(residual=False), "the file recorded"),
])
def test_tampered_forward_record_is_refused(tmp_path, edit, match):
    path, bad = tmp_path / "resnet.safetensors", tmp_path / "bad.safetensors"
    save(_fused(_bottlenecks(), torch.randn(1, 64, 8, 8)), path)
    assert_load_refused(fold_batchnorm(_bottlenecks()), rewrite(path, bad, edit_meta=edit), match)


def test_basic_block_trains_after_fusion():
    """A rewritten block without BatchNorm trains: the layers add the residual in torch when gradients flow."""
    torch.manual_seed(5)
    block = BasicBlock(64, 64, norm_layer=lambda c: nn.Identity())
    model = _prune_convs_(nn.Sequential(block)).train()
    sparse = sparsify(model, fuse_activations=True, trainable=True)
    assert isinstance(sparse[0], fx.GraphModule) and sparse.sparsify_report.layers[1].fused_residual
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    sparse(x).square().sum().backward()
    model(x_ref).square().sum().backward()
    assert relative_error(x.grad, x_ref.grad.double()) < 1e-5
    assert sparse[0].conv2.linear.values.grad is not None and sparse[0].conv1.linear.values.grad is not None


def test_copies_keep_the_record(tmp_path):
    """deepcopy and torch.save/torch.load of a rewritten model keep what save needs to record the rewrite."""
    import copy
    import io
    x = torch.randn(2, 64, 12, 12)
    sparse = _fused(_bottlenecks(), x)
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    for i, clone in enumerate((copy.deepcopy(sparse), torch.load(buf, weights_only=False))):
        path = tmp_path / f"copy{i}.safetensors"
        save(clone, path)
        fresh = load(fold_batchnorm(_bottlenecks(seed=7)), path)
        assert isinstance(fresh[1], fx.GraphModule) and fresh[1].conv3.activation == "relu"
        with torch.no_grad():
            assert torch.equal(fresh(x), sparse(x))


def test_swapped_layer_keeps_its_hooks():
    """A hook on a dense layer moves to the sparse one (its handle still removes it), which is then not fused."""
    torch.manual_seed(6)
    model = _prune_convs_(nn.Sequential(_Block("module")))
    seen = []
    handle = model[0].conv.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    sparse = sparsify(model, fuse_activations=True, inplace=True)
    assert sparse[0].conv.activation is None and not isinstance(sparse[0], fx.GraphModule)
    with torch.no_grad():
        sparse(torch.randn(1, 64, 5, 5))
    assert seen == ["SparseConv2d"]
    handle.remove()
    with torch.no_grad():
        sparse(torch.randn(1, 64, 5, 5))
    assert seen == ["SparseConv2d"]


# ---- Linear -> Dropout -> + residual (transformers' BERT-style output blocks) ------------------------------------
class _OutputBlock(nn.Module):
    """What transformers' BertSelfOutput / BertOutput compute: LayerNorm(dropout(dense(h)) + input)."""

    def __init__(self, kind: str = "bert", p: float = 0.1):
        super().__init__()
        self.kind = kind
        self.dense = nn.Linear(96, 64)
        self.dropout = nn.Dropout(p)
        self.LayerNorm = nn.LayerNorm(64)

    def forward(self, hidden, residual):
        y = self.dropout(self.dense(hidden))
        if self.kind == "bert":
            return self.LayerNorm(y + residual)
        if self.kind == "no_add":       # dropout without a residual add after it: nothing to fuse
            return self.LayerNorm(y)
        if self.kind == "twice":        # a second dropout in the chain: left alone
            return self.LayerNorm(self.dropout(y) + residual)
        raise AssertionError(self.kind)


class _Holder(nn.Module):
    """The block as a submodule (sparsify rewrites submodules' forward, not the root's)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden, residual):
        return self.block(hidden, residual)


def _pruned_output_block(kind: str = "bert", p: float = 0.1, seed: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    block = _OutputBlock(kind, p)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.dense.weight.mul_(block_mask(64, 96, (16, 16), 0.75, g))
    return _Holder(block)


def test_dropout_before_residual_fuses_and_keeps_training_semantics():
    model = _pruned_output_block()
    sparse = sparsify(model, block_size=(16, 16), fuse_activations=True)
    assert isinstance(sparse.block, fx.GraphModule) and sparse.sparsify_report.layers[0].fused_residual
    fused = [n for n in sparse.block.graph.nodes if n.op == "call_module" and n.target == "dense"]
    assert len(fused) == 1 and set(fused[0].kwargs) == {"residual", "residual_dropout"}
    h, r = torch.randn(3, 7, 96), torch.randn(3, 7, 64)
    model.eval(), sparse.eval()
    with torch.no_grad():
        assert relative_error(sparse(h, r), model(h, r).double()) < 1e-5
    # Training: the dropout is applied (same random draws as the dense block's) and gradients flow.
    model.train(), sparse.train()
    torch.manual_seed(11)
    want = model(h, r)
    torch.manual_seed(11)
    got = sparse(h, r)
    assert relative_error(got, want.double()) < 1e-5
    assert not torch.equal(got, sparse.eval()(h, r))  # the dropout did drop something
    # p = 0 or eval: the fused kernel path (the same numbers as the dense block's in eval).
    with torch.no_grad():
        assert relative_error(sparse.eval()(h, r), model.eval()(h, r).double()) < 1e-5


@pytest.mark.parametrize("kind", ["no_add", "twice"])
def test_dropout_chain_without_a_single_residual_is_left_alone(kind):
    sparse = sparsify(_pruned_output_block(kind), block_size=(16, 16), fuse_activations=True)
    assert not isinstance(sparse.block, fx.GraphModule)
    assert not sparse.sparsify_report.layers[0].fused_residual


def test_dropout_residual_needs_a_residual():
    sparse = sparsify(_pruned_output_block(), block_size=(16, 16))
    layer = sparse.block.dense
    with pytest.raises(ValueError, match="residual_dropout needs a residual"):
        layer(torch.randn(2, 96), residual_dropout=nn.Dropout(0.1))


def test_dropout_residual_rewrite_survives_a_checkpoint(tmp_path):
    sparse = sparsify(_pruned_output_block(), block_size=(16, 16), fuse_activations=True).eval()
    path = tmp_path / "bert_out.safetensors"
    save(sparse, path)
    fresh = load(_pruned_output_block(seed=9).eval(), path)
    assert isinstance(fresh.block, fx.GraphModule)
    h, r = torch.randn(2, 5, 96), torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(fresh(h, r), sparse(h, r))
