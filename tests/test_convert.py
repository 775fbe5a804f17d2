"""sparsify(): which layers are swapped, why the others are not, and that outputs equal the masked dense model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pysparse import sparsify
from pysparse.nn import (SparseConv2d, SparseLinear, UnstructuredSparseLinear, conv_weight_from_matrix,
                         conv_weight_matrix)
from pysparse.transforms.report import SparsifyReport


def _zero_blocks_(module: nn.Module, density: float, block_size=(16, 16), seed=0) -> None:
    """Zero a random subset of the (bh, bw) blocks of the layer's packing layout, keeping ~density of them."""
    g = torch.Generator().manual_seed(seed)
    w = module.weight
    mat = conv_weight_matrix(w) if w.dim() == 4 else w
    n, k = mat.shape
    bh, bw = block_size
    keep = torch.rand(-(-n // bh), -(-k // bw), generator=g) < density
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    with torch.no_grad():
        w.mul_(conv_weight_from_matrix(mask, w.shape) if w.dim() == 4 else mask)


class Net(nn.Module):
    """Conv stem, a depthwise conv, a 1x1 conv, an MLP head; one layer of each kind stays dense."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.body = nn.Sequential(nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                                  nn.Conv2d(48, 64, 1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 80), nn.GELU(), nn.Linear(80, 10))

    def forward(self, x):
        return self.head(self.body(self.dw(self.stem(x))))


def _pruned_net():
    torch.manual_seed(0)
    net = Net().eval()
    _zero_blocks_(net.body[0], 0.3, seed=1)
    _zero_blocks_(net.body[3], 0.25, seed=2)
    _zero_blocks_(net.head[1], 0.2, seed=3)
    _zero_blocks_(net.head[3], 0.6, seed=4)     # not sparse enough for min_sparsity=0.5
    return net


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_swaps_sparse_layers_and_matches_dense():
    net = _pruned_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = sparsify(net, block_size=(16, 16))
    assert isinstance(out.body[0], SparseConv2d) and isinstance(out.body[3], SparseConv2d)
    assert isinstance(out.head[1], SparseLinear)
    assert type(out.stem) is nn.Conv2d and type(out.dw) is nn.Conv2d and type(out.head[3]) is nn.Linear
    x = torch.randn(2, 3, 8, 8)
    assert _rel(out(x), net(x)) < 1e-5
    # Not inplace: the original model is untouched.
    assert type(net.body[0]) is nn.Conv2d
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())

    report = out.sparsify_report
    assert isinstance(report, SparsifyReport)
    assert [r.name for r in report] == ["stem", "dw", "body.0", "body.3", "head.1", "head.3"]
    assert {r.name for r in report.swapped} == {"body.0", "body.3", "head.1"}
    assert "groups=32" in report["dw"].reason and report["dw"].density is None
    assert "< min_sparsity" in report["stem"].reason and report["stem"].density == 1.0
    assert "< min_sparsity" in report["head.3"].reason
    swapped = report["head.1"]
    assert swapped.packed_bytes < swapped.dense_bytes and 0 < swapped.density <= 0.5
    assert swapped.density == out.head[1].density
    text = str(report)
    assert "head.1" in text and "groups=32" in text and "3/6 layers sparse" in text


def test_single_entries_take_the_unstructured_format():
    """block_size (1, 1): linear layers get the unstructured format and kernel (not 1x1 blocks), with and without
    fused activations; convolutions keep 1x1 blocks."""
    net = _pruned_net()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in (net.body[0], net.head[1], net.head[3]):
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) < 0.3)
    x = torch.randn(2, 3, 8, 8)
    for fuse in (False, True):
        out = sparsify(net, block_size=(1, 1), fuse_activations=fuse, fast_attention=False)
        assert isinstance(out.head[1], UnstructuredSparseLinear) and isinstance(out.head[3], UnstructuredSparseLinear)
        assert type(out.body[0]) is SparseConv2d and out.body[0].block_size == (1, 1)
        assert out.head[1].weight.nnz == int((net.head[1].weight != 0).sum())
        assert _rel(out(x), net(x)) < 1e-5


def test_inplace_and_min_sparsity():
    net = _pruned_net()
    x = torch.randn(1, 3, 8, 8)
    expected = net(x)
    out = sparsify(net, block_size=(16, 16), min_sparsity=0.0, inplace=True)
    assert out is net
    assert isinstance(net.head[3], SparseLinear) and isinstance(net.stem, SparseConv2d)
    assert _rel(net(x), expected) < 1e-5


def test_filter_fn_and_block_size():
    net = _pruned_net()
    out = sparsify(net, block_size=(16, 16), filter_fn=lambda name, m: not name.startswith("body"))
    assert type(out.body[0]) is nn.Conv2d and isinstance(out.head[1], SparseLinear)
    assert out.sparsify_report["body.0"].reason == "excluded by filter_fn"
    # Blocks of another size see other densities: the head's 16x16 zero blocks are not whole 64x64 blocks.
    out64 = sparsify(net, block_size=64)
    assert out64.sparsify_report.block_size == (64, 64)
    assert out64.sparsify_report["head.1"].density > out.sparsify_report["head.1"].density


def test_layers_that_must_stay_dense():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
            self.enc = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
            self.f64 = nn.Linear(32, 32).double()
            self.tied_a = nn.Linear(32, 32)
            self.tied_b = nn.Linear(32, 32)
            self.tied_b.weight = self.tied_a.weight
            self.lazy = nn.LazyLinear(32)

            class MyLinear(nn.Linear):
                def forward(self, x):
                    return super().forward(x) * 2

            self.custom = MyLinear(32, 32)

    model = Odd()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not isinstance(m.weight, nn.parameter.UninitializedParameter):
                m.weight.zero_()
    report = sparsify(model, min_sparsity=0.0).sparsify_report
    assert not report.swapped
    reasons = {r.name: r.reason for r in report}
    assert "MultiheadAttention" in reasons["attn.out_proj"]
    assert "TransformerEncoderLayer" in reasons["enc.linear1"]
    assert "float64" in reasons["f64"]
    assert "shared" in reasons["tied_a"] and "shared" in reasons["tied_b"]
    assert "lazy" in reasons["lazy"]
    assert "overrides" in reasons["custom"]


def test_module_registered_twice_and_root_layer():
    lin = nn.Linear(64, 64)
    _zero_blocks_(lin, 0.25)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    out = sparsify(model, block_size=(16, 16))
    assert isinstance(out[0], SparseLinear) and out[0] is out[2]
    assert [r.name for r in out.sparsify_report] == ["0"]
    x = torch.randn(3, 64)
    assert _rel(out(x), model(x)) < 1e-5
    root = sparsify(lin, block_size=(16, 16))
    assert isinstance(root, SparseLinear) and root.sparsify_report[""].swapped
    assert _rel(root(x), lin(x)) < 1e-5


def test_trainable():
    out = sparsify(_pruned_net(), block_size=(16, 16), trainable=True)
    names = {n for n, _ in out.named_parameters()}
    assert "head.1.values" in names and "body.0.linear.values" in names
    frozen = sparsify(_pruned_net(), block_size=(16, 16))
    assert "head.1.values" not in {n for n, _ in frozen.named_parameters()}
    assert "head.1.values" in {n for n, _ in frozen.named_buffers()}


def test_autotune_decides_by_measurement():
    net = _pruned_net()
    x = torch.randn(2, 3, 8, 8)
    out = sparsify(net, block_size=(16, 16), autotune=True, example_inputs=(x,))
    timed = [r for r in out.sparsify_report if r.dense_ms is not None]
    assert {r.name for r in timed} == {"body.0", "body.3", "head.1"}   # the candidates, nothing else
    for r in timed:
        assert r.sparse_ms > 0 and r.dense_ms > 0
        assert r.swapped == (r.sparse_ms < r.dense_ms)
        assert r.reason.startswith("autotune:")
        module = out.get_submodule(r.name)
        assert isinstance(module, (SparseLinear, SparseConv2d)) == r.swapped
    assert _rel(out(x), net(x)) < 1e-5


def test_autotune_leaves_training_state_alone():
    net = _pruned_net().train()
    stats = net.body[1].running_mean.clone()
    out = sparsify(net, block_size=(16, 16), autotune=True, example_inputs=torch.randn(2, 3, 8, 8), inplace=True)
    assert torch.equal(out.body[1].running_mean, stats)
    assert all(m.training for m in out.modules())


def test_autotune_keeps_unreached_layers_dense():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    model = TwoHeads()
    _zero_blocks_(model.a, 0.25)
    _zero_blocks_(model.b, 0.25)
    out = sparsify(model, block_size=(16, 16), autotune=True, example_inputs={"x": torch.randn(4, 64)})
    assert type(out.b) is nn.Linear
    assert "not reached" in out.sparsify_report["b"].reason


def test_on_device(device):
    net = _pruned_net().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    out = sparsify(net, block_size=(16, 16))
    assert out.head[1].values.device.type == device.type
    # float64 reference: cuDNN's dense float32 convs may use TF32, the sparse kernels do not
    assert _rel(out(x).double(), net.double()(x.double())) < 1e-5


def test_compile_sparsified_model():
    torch._dynamo.reset()
    net = _pruned_net()
    out = sparsify(net, block_size=(16, 16))
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(out, backend="aot_eager", fullgraph=True)   # fullgraph: no graph break anywhere
    assert _rel(compiled(x), out(x)) < 1e-6


@pytest.mark.slow
def test_compile_inductor():
    torch._dynamo.reset()
    out = sparsify(_pruned_net(), block_size=(16, 16))
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(out, fullgraph=True)
    assert _rel(compiled(x), out(x)) < 1e-5


def test_bad_arguments():
    net = _pruned_net()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsify("net")
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(net, min_sparsity=1.5)
    with pytest.raises(ValueError, match="block_size"):
        sparsify(net, block_size=(0, 32))
    with pytest.raises(TypeError, match="filter_fn"):
        sparsify(net, filter_fn=3)
    with pytest.raises(ValueError, match="example_inputs"):
        sparsify(net, autotune=True)
    with pytest.raises(TypeError, match="example_inputs"):
        sparsify(net, example_inputs=3)
    with pytest.raises(TypeError, match="fuse_activations must be None"):
        sparsify(net, fuse_activations="yes")
    with pytest.raises(TypeError, match="fast_attention must be None"):
        sparsify(net, fast_attention=1)


# ---- defaults: exact inference optimisations on in eval mode, off for training ---------------------------------------
def _fused(model: nn.Module) -> list[str]:
    return [r.name for r in model.sparsify_report.swapped if r.fused_activation or r.fused_residual]


def _all_off(model: nn.Module, **kw) -> nn.Module:
    return sparsify(model, fuse_activations=False, fast_attention=False, **kw)


def test_eval_mode_gets_fusions_by_default_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 8)).eval()
    for i, layer in enumerate((mlp[0], mlp[2], mlp[4])):
        _zero_blocks_(layer, 0.4, seed=i)
    default, off = sparsify(mlp, block_size=(16, 16)), _all_off(mlp, block_size=(16, 16))
    assert _fused(default) == ["0", "2"] and _fused(off) == []
    assert isinstance(default[1], nn.Identity) and isinstance(off[1], nn.ReLU)
    text = str(default.sparsify_report)
    assert "defaults: fuse_activations=True, fast_attention=True (the model is in eval mode" in text
    assert "defaults:" not in str(off.sparsify_report)
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert _rel(default(x), off(x)) < 1e-5


def _pruned_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(config, attn_implementation="sdpa").eval()
    for i, (_, layer) in enumerate((n, m) for n, m in model.encoder.named_modules() if isinstance(m, nn.Linear)):
        _zero_blocks_(layer, 0.4, seed=i)
    return model


def test_eval_mode_gets_fusions_and_fast_attention_by_default_bert():
    bert = _pruned_bert()
    default, off = sparsify(bert, block_size=(16, 16)), _all_off(bert, block_size=(16, 16))
    assert default.config._attn_implementation == "pysparse_sdpa" and off.config._attn_implementation == "sdpa"
    assert any(n.endswith("intermediate.dense") for n in _fused(default)) and _fused(off) == []
    assert "attention: pysparse CPU kernel" in str(default.sparsify_report)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    inputs = {"input_ids": torch.randint(0, 100, (3, 11), generator=g), "attention_mask": mask}
    with torch.no_grad():
        assert _rel(default(**inputs).last_hidden_state, off(**inputs).last_hidden_state) < 1e-5
    # each can be turned off alone
    no_attention = sparsify(bert, block_size=(16, 16), fast_attention=False)
    assert no_attention.config._attn_implementation == "sdpa" and _fused(no_attention) == _fused(default)
    assert "defaults: fuse_activations=True (" in str(no_attention.sparsify_report)
    no_fusion = sparsify(bert, block_size=(16, 16), fuse_activations=False)
    assert no_fusion.config._attn_implementation == "pysparse_sdpa" and _fused(no_fusion) == []


def test_training_gets_nothing_that_changes_training():
    bert = _pruned_bert()
    for training, kw, why in ((True, {}, "the model is in training mode"),
                              (False, {"trainable": True}, "trainable=True")):
        out = sparsify(bert.train(training), block_size=(16, 16), **kw)
        assert out.config._attn_implementation == "sdpa" and _fused(out) == []
        assert f"defaults: fuse_activations=False, fast_attention=False ({why}: nothing that changes training" in str(
            out.sparsify_report)
    # asked for explicitly, they are still done in training mode
    explicit = sparsify(bert.train(), block_size=(16, 16), fuse_activations=True, fast_attention=True)
    assert explicit.config._attn_implementation == "pysparse_sdpa" and _fused(explicit)
