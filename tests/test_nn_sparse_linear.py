"""SparseLinear: forward equals the masked dense layer; .to(), state_dict, repr, torch.compile."""
import pytest
import torch
from torch import nn

from conftest import DTYPES, assert_matches_reference, generator_for, make_case, sample_specs
from pysparse.formats import BlockSparseWeight
from pysparse.nn import SparseLinear

SPECS = sample_specs()


def dense_linear(case) -> nn.Linear:
    """The nn.Linear a user would start from: case.weight (unmasked when the case packs with a mask)."""
    n, k = case.weight.shape
    linear = nn.Linear(k, n, bias=case.bias is not None, device=case.weight.device, dtype=case.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(case.weight)
        if case.bias is not None:
            linear.bias.copy_(case.bias)
    return linear


def random_layer(name, n, k, block_size, keep_fraction, dtype=torch.float32, bias=True):
    gen = generator_for(name)
    linear = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    bh, bw = block_size
    blocks = torch.rand(-(-n // bh), -(-k // bw), generator=gen) < keep_fraction  # about keep_fraction of blocks
    mask = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    return linear, mask, SparseLinear.from_dense(linear, block_size, mask=mask)


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_forward_matches_masked_dense_layer(spec, device):
    case = make_case(spec, device)
    layer = SparseLinear.from_dense(dense_linear(case), spec.block_size, mask=case.mask)
    assert (layer.in_features, layer.out_features) == (case.weight.shape[1], case.weight.shape[0])
    assert layer.block_size == spec.block_size
    with torch.no_grad():
        out = layer(case.x)
    assert_matches_reference(out, case.reference(), spec.dtype, spec.id)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_to_dtype(dtype, device):
    linear, mask, layer = random_layer(f"to-{dtype}", 37, 45, (8, 16), 0.6)
    layer = layer.to(device=device, dtype=dtype)
    assert layer.values.dtype == dtype and layer.bias.dtype == dtype
    assert layer.crow_indices.dtype == torch.int32 and layer.col_indices.dtype == torch.int32
    assert layer.values.device.type == device.type and layer.crow_indices.device.type == device.type
    x = torch.randn(6, 45, generator=generator_for(f"to-x-{dtype}")).to(device=device, dtype=dtype)
    masked = (linear.weight * mask).to(device=device, dtype=dtype)
    ref = torch.nn.functional.linear(x.double(), masked.double(), linear.bias.to(device=device, dtype=dtype).double())
    with torch.no_grad():
        assert_matches_reference(layer(x), ref, dtype)


def test_state_dict_round_trip_into_a_different_pattern(device):
    """A fresh layer of the same shape but another sparsity pattern (other number of blocks) adopts the saved one."""
    _, _, saved = random_layer("sd-saved", 50, 70, (16, 16), 0.3)
    _, _, fresh = random_layer("sd-fresh", 50, 70, (16, 16), 1.0)
    saved, fresh = saved.to(device), fresh.to(device)
    assert fresh.values.shape != saved.values.shape
    state = saved.state_dict()
    assert set(state) == {"values", "crow_indices", "col_indices", "bias"}
    fresh.load_state_dict(state)
    for name, tensor in state.items():
        assert torch.equal(getattr(fresh, name), tensor), name
    x = torch.randn(4, 70, generator=generator_for("sd-x")).to(device)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))
    assert fresh.density == saved.density


def test_state_dict_loads_across_block_sizes_and_devices(device):
    """Saved on CPU with 8x8 blocks, loaded into a layer with 16x4 blocks on `device`."""
    _, _, saved = random_layer("sd-bs-saved", 30, 20, (8, 8), 0.5)
    _, _, fresh = random_layer("sd-bs-fresh", 30, 20, (16, 4), 0.5)
    fresh = fresh.to(device)
    fresh.load_state_dict(saved.state_dict())
    assert fresh.block_size == (8, 8) and fresh.values.device.type == device.type
    x = torch.randn(3, 20, generator=generator_for("sd-bs-x"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x.to(device)).cpu(), saved(x), rtol=1e-5, atol=1e-5)


def test_corrupted_state_dict_is_refused_and_the_layer_kept():
    _, _, layer = random_layer("corrupt", 24, 24, (8, 8), 1.0)  # every block kept: col_indices[0] exists
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = layer.state_dict()
    state["col_indices"] = state["col_indices"].clone()
    state["col_indices"][0] = 99
    with pytest.raises(RuntimeError, match="col_indices"):
        layer.load_state_dict(state)
    for name, tensor in before.items():
        assert torch.equal(getattr(layer, name), tensor), name


def test_state_dict_missing_keys_are_reported():
    _, _, layer = random_layer("missing", 24, 24, (8, 8), 0.5)
    state = layer.state_dict()
    del state["bias"]
    with pytest.raises(RuntimeError, match="bias"):
        layer.load_state_dict(state)


def test_repr_shows_shape_block_size_and_density():
    _, _, layer = random_layer("repr", 40, 56, (8, 16), 0.2, bias=False)
    text = repr(layer)
    assert "in_features=56" in text and "out_features=40" in text
    assert "block_size=(8, 16)" in text
    assert f"density={layer.density:.3f}" in text
    n_blocks = layer.values.shape[0]
    assert layer.density == pytest.approx(n_blocks / (5 * 4))


def test_from_dense_without_mask_keeps_nonzero_blocks():
    gen = generator_for("nomask")
    linear = nn.Linear(20, 12)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(12, 20, generator=gen))
        linear.weight[4:8] = 0  # one whole block row of 4x5 blocks
        linear.weight[:, 15:] = 0  # one whole block column
    layer = SparseLinear.from_dense(linear, (4, 5))
    assert layer.values.shape[0] == 3 * 4 - 4 - 2
    assert torch.equal(layer.to_linear().weight, linear.weight)


def test_input_with_wrong_in_features_is_refused():
    """32 columns with 16-wide blocks: 30 would round up to the same 2 block columns and silently misuse them."""
    _, _, layer = random_layer("wrong-k", 8, 32, (8, 16), 1.0)
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(3, 30))
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.tensor(1.0))


def test_forward_follows_parts_replaced_by_hand():
    """forward reads its packed parts from the module's dicts (fast); a part deleted or re-registered by hand falls
    back to the normal attribute lookup, so the layer computes with what it holds or fails as any module would."""
    linear, mask, layer = random_layer("by-hand", 24, 40, (8, 8), 0.5)
    x = torch.randn(3, 40, generator=generator_for("by-hand-x"))
    with torch.no_grad():
        want = nn.functional.linear(x, linear.weight * mask, linear.bias)
        bias = layer.bias.detach().clone()
        del layer.bias
        with pytest.raises(AttributeError, match="bias"):
            layer(x)
        layer.register_buffer("bias", bias + 1)  # a buffer now, not a parameter
        torch.testing.assert_close(layer(x), want + 1)
        layer.bias = None
        torch.testing.assert_close(layer(x), want - linear.bias)
        values = layer.values
        del layer.values
        layer.values = nn.Parameter(values * 2)  # trainable from now on: read from _parameters
        torch.testing.assert_close(layer(x), 2 * (want - linear.bias))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """One small compile (slow on 2 cores): a model holding two SparseLinear layers, traced whole."""
    _, _, first = random_layer("compile-1", 48, 40, (16, 8), 0.5)
    _, _, second = random_layer("compile-2", 24, 48, (8, 16), 0.5, bias=False)
    model = nn.Sequential(first, nn.GELU(), second)
    x = torch.randn(2, 5, 40, generator=generator_for("compile-x"))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    # Relative to the largest output (DESIGN.md's convention): inductor generates its own GELU, which differs from
    # eager's by float32 rounding, so an elementwise rtol fails on outputs near zero.
    err = (compiled - eager).abs().max() / eager.abs().max()
    assert err < 1e-5, f"compiled vs eager: rel err {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_property_round_trips(dtype):
    """layer.weight / to_linear() give back exactly the masked weight (cast to the layer's dtype)."""
    linear, mask, layer = random_layer(f"weight-{dtype}", 21, 19, (4, 8), 0.5)
    layer = layer.to(dtype)
    expected = (linear.weight.detach() * mask).to(dtype)
    weight = layer.weight
    assert isinstance(weight, BlockSparseWeight) and weight.shape == (21, 19) and weight.dtype == dtype
    assert torch.equal(weight.to_dense(), expected)
    dense = layer.to_linear()
    assert torch.equal(dense.weight.detach(), expected) and torch.equal(dense.bias.detach(), layer.bias.detach())
