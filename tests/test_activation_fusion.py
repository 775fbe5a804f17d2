"""Fused activations: bsr_linear(..., activation=) against the masked dense reference, SparseLinear(activation=)
in inference and training, sparsify(fuse_activations=True)'s rules, and checkpoints of fused layers."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint_tools import assert_load_refused, rewrite
from conftest import SEED, TOLERANCE, assert_matches_reference, make_case, relative_error
from epilogue_cases import CONV_PATHS, ROWS, SPECS, sparse_conv
from pysparse import load, save, sparsify
from pysparse.bench.sweep import block_mask
from pysparse.formats import BlockSparseWeight
from pysparse.nn import SparseConv2d, SparseLinear
from pysparse.ops import ACTIVATIONS, bsr_conv2d_nhwc, bsr_conv2d_nhwc_reference, bsr_linear


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_fused_op_matches_dense_reference(spec, rows, activation):
    case = make_case(spec, "cpu", salt=f"act{rows}")
    x = case.x
    if x.dim() == 2:  # the case draws its own M; these tests need every kernel's range
        x = torch.randn(rows, x.shape[-1], generator=torch.Generator().manual_seed(rows)).to(spec.dtype) * 2
    p = case.packed
    with torch.no_grad():
        out = bsr_linear(x, p.values, p.crow_indices, p.col_indices, case.bias, case.out_features,
                         activation=activation)
    bias = None if case.bias is None else case.bias.double()
    pre = F.linear(x.double(), case.masked_weight.double(), bias)
    ref = ACTIVATIONS[activation](pre)
    what = f"{spec.id} M={rows} {activation} (seed {SEED})"
    if activation == "gelu" and spec.dtype == torch.float32 and ref.numel():
        # The fused GELU's error is absolute, at most 2e-7 x |pre-activation| (its erf is a rational fit to
        # 4e-7; torch's float32 F.gelu loses ~1e-7 x |x| in the negative tail to the same 1 + erf cancellation),
        # so outputs that are all small next to their inputs are held to the input's scale.
        assert out.shape == ref.shape and bool(torch.isfinite(out).all()), what
        err = (out.double() - ref).abs().max().item()
        bound = TOLERANCE[torch.float32] * ref.abs().max().item() + 2e-7 * pre.abs().max().item()
        assert err <= bound, f"{what}: max |error| {err:.3g} > {bound:.3g}"
        return
    assert_matches_reference(out, ref, spec.dtype, what)


def test_fused_activation_special_values():
    """Large magnitudes saturate as in torch; a NaN (here from the bias) propagates through both activations."""
    eye = nn.Linear(64, 64)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(64))
        eye.bias.zero_()
        eye.bias[10] = float("nan")
    packed = SparseLinear.from_dense(eye, (16, 16))
    x = torch.tensor([-1e4, -30.0, -5.0, -1e-3, 0.0, 1e-3, 0.7, 5.0, 30.0, 1e4, -0.5] * 6)[:64]
    for rows in (1, 100):
        xs = x.repeat(rows, 1)
        for name, fn in ACTIVATIONS.items():
            packed.activation = name
            with torch.no_grad():
                got = packed(xs)
            torch.testing.assert_close(got, fn(eye(xs)), atol=1e-6, rtol=1e-6, equal_nan=True)
            assert bool(got[:, 10].isnan().all())


def test_bad_activation_is_refused():
    p = SparseLinear.from_dense(nn.Linear(32, 32), (16, 16))
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="activation must be None or one of"):
        bsr_linear(x, p.values, p.crow_indices, p.col_indices, None, 32, activation="tanh")
    with pytest.raises(ValueError, match="activation must be 'relu', 'relu6' or 'gelu'"):
        torch.ops.pysparse.bsr_linear_act(x, p.values, p.crow_indices, p.col_indices, None, 32, "swish")
    with pytest.raises(ValueError, match="activation"):
        SparseLinear(p.weight, activation="GELU")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_sparse_linear_activation_trains_like_dense(activation):
    """With gradients the layer runs the op then the torch activation: same output and gradients as dense."""
    torch.manual_seed(1)
    dense = nn.Linear(70, 90)
    mask = block_mask(90, 70, (16, 16), 0.5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer = SparseLinear.from_dense(dense, (16, 16), trainable=True, activation=activation)
    x = torch.randn(5, 70, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ACTIVATIONS[activation](dense(x_ref)).square().sum().backward()
    layer(x).square().sum().backward()
    assert relative_error(x.grad, x_ref.grad.double()) < 1e-5
    assert relative_error(layer.bias.grad, dense.bias.grad.double()) < 1e-5
    # The dense gradient over the kept blocks, packed in the layer's block order.
    expected = BlockSparseWeight.from_dense(dense.weight.grad, (16, 16), mask=mask).values
    assert relative_error(layer.values.grad, expected.double()) < 1e-5
    with torch.no_grad():  # inference takes the fused kernel: same result
        assert relative_error(layer(x), ACTIVATIONS[activation](dense(x)).double()) < 1e-5
    assert type(layer.to_linear()[1]) is {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU}[activation]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_sparse_linear_activation_on_every_device(device, activation):
    """CUDA has no fused kernel: the layer runs the op, then the torch activation; same result everywhere."""
    torch.manual_seed(2)
    dense = nn.Linear(96, 130)
    with torch.no_grad():
        dense.weight.mul_(block_mask(130, 96, (32, 32), 0.5, torch.Generator().manual_seed(4)))
    layer = SparseLinear.from_dense(dense, (32, 32), activation=activation).to(device)
    x = torch.randn(70, 96)
    with torch.no_grad():
        out = layer(x.to(device))
    assert out.device.type == device.type
    assert relative_error(out.cpu(), ACTIVATIONS[activation](dense(x)).double()) < 1e-5


def test_forward_mode_ad_is_refused_not_dropped():
    """No forward-mode formula exists: a dual input must raise, not come back without its tangent."""
    import torch.autograd.forward_ad as fwAD
    layer = SparseLinear.from_dense(nn.Linear(64, 64, bias=False), (32, 32), activation="relu")
    plain = SparseLinear.from_dense(nn.Linear(64, 64, bias=False), (32, 32))
    for m in (layer, plain):
        with fwAD.dual_level(), torch.no_grad():
            x = fwAD.make_dual(torch.randn(3, 64), torch.randn(3, 64))
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                m(x)


def test_fused_layer_compiles_without_graph_break():
    layer = SparseLinear.from_dense(nn.Linear(96, 64), (32, 32), activation="gelu")
    x = torch.randn(70, 96)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), layer(x).double()) < 1e-6


# ---- sparsify(fuse_activations=True) ----------------------------------------------------------------------------
def _sparse_linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.mul_(block_mask(n_out, n_in, (32, 32), 0.75, torch.Generator().manual_seed(seed)))
    return lin


class BertStyle(nn.Module):
    """Same forward code as transformers' BertIntermediate: the fusable pattern."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.dense = _sparse_linear(64, 96, 5)
        self.intermediate_act_fn = act

    def forward(self, hidden_states):
        hidden_states = self.dense(hidden_states)
        hidden_states = self.intermediate_act_fn(hidden_states)
        return hidden_states


class ReadsOutputTwice(BertStyle):
    def forward(self, hidden_states):
        hidden_states = self.dense(hidden_states)
        return self.intermediate_act_fn(hidden_states) + hidden_states


def _fused(model: nn.Module) -> dict:
    with torch.no_grad():
        x = torch.randn(7, 64)
        expected = model(x)
        sparse = sparsify(model, fuse_activations=True)
        assert relative_error(sparse(x), expected.double()) < 1e-5
    return {r.name: r.fused_activation for r in sparse.sparsify_report.swapped}


def test_sparsify_fuses_only_provable_pairs():
    seq = nn.Sequential(_sparse_linear(64, 64, 1), nn.ReLU(inplace=True), _sparse_linear(64, 64, 2),
                        nn.GELU(approximate="tanh"), _sparse_linear(64, 64, 3), nn.GELU(), _sparse_linear(64, 64, 4),
                        nn.Identity(), nn.ReLU6(), _sparse_linear(64, 64, 5), nn.SiLU(), nn.Linear(64, 8))
    # tanh GELU is another function; SiLU has no fused form
    assert _fused(seq) == {"0": "relu", "2": None, "4": "gelu", "6": "relu6", "9": None}
    assert _fused(BertStyle(nn.GELU())) == {"dense": "gelu"}
    assert _fused(ReadsOutputTwice(nn.ReLU())) == {"dense": None}  # the layer's output is read twice
    hooked = BertStyle(nn.ReLU())
    hooked.intermediate_act_fn.register_forward_hook(lambda *a: None)
    assert _fused(hooked) == {"dense": None}
    shared = _sparse_linear(64, 64, 4)   # one layer in two places: fusing would change the other use
    assert _fused(nn.Sequential(shared, nn.ReLU(), shared)) == {"0": None}   # reported once, under its first name
    # Without the flag nothing moves.
    plain = sparsify(nn.Sequential(_sparse_linear(64, 64, 1), nn.ReLU()))
    assert isinstance(plain[1], nn.ReLU) and plain[0].activation is None


def test_transformers_gelu_activation_is_recognised():
    transformers = pytest.importorskip("transformers")
    from transformers.activations import ACT2FN
    from pysparse.transforms.activation_fusion import activation_name
    assert activation_name(ACT2FN["gelu"]) == "gelu"
    assert activation_name(ACT2FN["gelu_new"]) is None   # the tanh approximation
    assert activation_name(ACT2FN["relu"]) == "relu"
    assert activation_name(ACT2FN["relu6"]) == "relu6"
    assert transformers is not None


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def _fused_seq():
    return nn.Sequential(_sparse_linear(64, 64, 1), nn.ReLU(), _sparse_linear(64, 64, 2), nn.GELU())


def test_fused_checkpoint_round_trip(tmp_path):
    sparse = sparsify(_fused_seq(), fuse_activations=True)
    path = tmp_path / "fused.safetensors"
    save(sparse, path)
    fresh = load(_fused_seq(), path)
    assert [type(m).__name__ for m in fresh] == ["SparseLinear", "Identity", "SparseLinear", "Identity"]
    assert (fresh[0].activation, fresh[2].activation) == ("relu", "gelu")
    x = torch.randn(9, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), sparse(x))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"][0].update(activation="swish"), "activation must be one of"),
    (lambda m: m["layers"][0].update(activation_source=3), "activation_source must be"),
    (lambda m: m["layers"][0].update(activation_source="2"), "fused the relu of 2, which is a Linear"),
    (lambda m: m["layers"][0].update(activation_source="9"), "which is a NoneType"),
    (lambda m: m["layers"][1].update(activation="relu"), "fused the relu of 3, which is a GELU"),
])
def test_tampered_fusion_record_is_refused(tmp_path, edit, match):
    path, bad = tmp_path / "fused.safetensors", tmp_path / "bad.safetensors"
    save(sparsify(_fused_seq(), fuse_activations=True), path)
    assert_load_refused(_fused_seq(), rewrite(path, bad, edit_meta=edit), match)


# ---- convolutions ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("geometry, grad", CONV_PATHS)
def test_sparse_conv_activation_every_path(geometry, grad, activation):
    g = dict(geometry)
    c_in, k = g.pop("c_in"), g.pop("k")
    dense = sparse_conv(c_in, 96, k, 6, **g)
    layer = SparseConv2d.from_dense(dense, (32, 32), activation=activation, trainable=grad)
    x = torch.randn(2, c_in, 11, 13, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = layer(x)
        ref = ACTIVATIONS[activation](dense(x))
    assert relative_error(out.detach(), ref.detach().double()) < 1e-5
    if grad:
        out.square().sum().backward()
        assert layer.linear.values.grad is not None and x.grad is not None


def test_bsr_conv2d_op_activation_matches_reference():
    conv = sparse_conv(64, 80, 3, 8)
    layer = SparseConv2d.from_dense(conv, (16, 16))
    lin = layer.linear
    x = torch.randn(2, 9, 10, 64)
    for act in (None, *sorted(ACTIVATIONS)):
        args = (x, lin.values, lin.crow_indices, lin.col_indices, lin.bias, 80, 3, 1, 1, act)
        with torch.no_grad():
            assert relative_error(bsr_conv2d_nhwc(*args), bsr_conv2d_nhwc_reference(*args).double()) < 1e-5
    with pytest.raises(ValueError, match="activation"):
        bsr_conv2d_nhwc(x, lin.values, lin.crow_indices, lin.col_indices, lin.bias, 80, 3, activation="elu")


def test_sparsify_fuses_conv_relu_through_folded_batchnorm(tmp_path):
    def block():
        torch.manual_seed(9)
        return nn.Sequential(sparse_conv(64, 64, 3, 10, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             sparse_conv(64, 64, 1, 11), nn.ReLU()).eval()
    model = block()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        sparse = sparsify(model, fold_batchnorm=True, fuse_activations=True)
        assert relative_error(sparse(x), model(x).double()) < 1e-5
    assert [type(m).__name__ for m in sparse] == ["SparseConv2d", "Identity", "Identity", "SparseConv2d", "Identity"]
    assert (sparse[0].activation, sparse[3].activation) == ("relu", "relu")
    # A checkpoint of a model without BatchNorm: load redoes the fusion on a fresh dense model.
    plain = nn.Sequential(sparse_conv(64, 64, 3, 12, padding=1), nn.GELU(), sparse_conv(64, 32, 1, 13)).eval()
    fused = sparsify(plain, fuse_activations=True)
    save(fused, tmp_path / "conv.safetensors")
    fresh = load(nn.Sequential(sparse_conv(64, 64, 3, 12, padding=1), nn.GELU(), sparse_conv(64, 32, 1, 13)),
                 tmp_path / "conv.safetensors")
    assert isinstance(fresh[1], nn.Identity) and fresh[0].activation == "gelu"
    with torch.no_grad():
        assert torch.equal(fresh(x), fused(x))
    assert isinstance(fused[0].to_conv2d()[1], nn.GELU)
