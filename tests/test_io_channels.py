"""pysparse.io with channel pruning: the surgery prune_channels did, and channel-sparse layers swapped in by hand,
round-trip through save/load into a freshly built dense model; tampered records and index arrays raise ValueError
and leave the model unchanged."""
from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from checkpoint_tools import assert_load_refused, rewrite, snapshot, unchanged
from pysparse import sparsify
from pysparse.io import load, save
from pysparse.nn import ChannelSparseConv2d, ChannelSparseLinear, SparseConv2d, SparseLinear
from pysparse.prune import apply_channel_surgery, channel_surgery_record, prune_, prune_channels, remove_masks


class ResCNN(nn.Module):
    """A residual CNN small enough for fast tests: stem, a residual block, a strided conv, a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x))


def random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters away from the identity, so that a buffer not loaded shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def pruned_rescnn(seed=0):
    torch.manual_seed(seed)
    return prune_channels(random_bn(ResCNN(), seed).eval(), X[:1], ratio=0.5).eval()


# ---- round trips --------------------------------------------------------------------------------------------------
def test_resnet18_pruned_round_trip(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = random_bn(torchvision.models.resnet18(num_classes=10)).eval()
    dense_params = n_params(model)
    pruned = prune_channels(model, x[:1], ratio=0.5)
    assert n_params(pruned) < dense_params / 2
    save(pruned, tmp_path / "r18.safetensors")
    fresh = load(torchvision.models.resnet18(num_classes=10).eval(), tmp_path / "r18.safetensors")
    assert n_params(fresh) == n_params(pruned)
    assert fresh.layer1[0].conv1.out_channels == pruned.layer1[0].conv1.out_channels < 64
    with torch.no_grad():
        assert rel_err(fresh(x), pruned(x)) < 1e-5
    assert channel_surgery_record(fresh) == channel_surgery_record(pruned)


def test_record_is_json_in_the_metadata_and_loads_twice(tmp_path):
    pruned = pruned_rescnn()
    path = tmp_path / "m.safetensors"
    save(pruned, path)
    with safetensors.safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["pysparse"])
    assert meta["channel_surgery"] == channel_surgery_record(pruned) and meta["layers"] == []
    fresh = load(ResCNN(), path).eval()
    # Loading again into the model that now carries the same surgery works (nothing is cut twice).
    assert load(fresh, path) is fresh
    with torch.no_grad():
        assert rel_err(fresh(X), pruned(X)) < 1e-5
    assert n_params(fresh) == n_params(pruned)


def test_model_without_surgery_has_no_record(tmp_path):
    path = tmp_path / "dense.safetensors"
    save(ResCNN(), path)
    with safetensors.safe_open(str(path), "pt") as f:
        assert "channel_surgery" not in json.loads(f.metadata()["pysparse"])
    assert channel_surgery_record(load(ResCNN(), path)) is None


def test_channel_pruned_then_block_sparsified(tmp_path):
    """The two compose: surgery first, then block-sparse layers over the smaller dense ones."""
    pruned = pruned_rescnn(seed=2)
    prune_(pruned, sparsity=0.6, pattern="block", block_size=(8, 8),
           filter_fn=lambda name, m: name in ("block.0", "head.1"))
    remove_masks(pruned)
    sparse = sparsify(pruned, block_size=(8, 8))
    assert isinstance(sparse.block[0], SparseConv2d) and isinstance(sparse.head[1], SparseLinear)
    save(sparse, tmp_path / "both.safetensors")
    fresh = load(ResCNN().eval(), tmp_path / "both.safetensors")
    assert isinstance(fresh.block[0], SparseConv2d) and isinstance(fresh.head[1], SparseLinear)
    assert n_params(fresh) == n_params(sparse)
    with torch.no_grad():
        assert rel_err(fresh(X), sparse(X)) < 1e-5
        assert rel_err(fresh(X), pruned(X)) < 1e-5


def test_pruned_submodule_is_saved_in_the_models_names(tmp_path):
    torch.manual_seed(3)
    model = random_bn(ResCNN()).eval()
    prune_channels(model.block, torch.randn(1, 32, 8, 8), ratio=0.5, round_to=1)   # only the block's inner width
    assert model.block[0].out_channels < 32
    save(model, tmp_path / "sub.safetensors")
    fresh = load(ResCNN().eval(), tmp_path / "sub.safetensors")
    assert fresh.block[0].out_channels == model.block[0].out_channels
    with torch.no_grad():
        assert rel_err(fresh(X), model(X)) < 1e-5
    # The reloaded model holds the whole record itself: saving it again gives the same checkpoint.
    save(fresh, tmp_path / "again.safetensors")
    assert rel_err(load(ResCNN().eval(), tmp_path / "again.safetensors")(X), model(X)) < 1e-5


def test_save_refuses_surgery_recorded_on_nested_modules(tmp_path):
    torch.manual_seed(4)
    model = ResCNN().eval()
    prune_channels(model.block, torch.randn(1, 32, 8, 8), ratio=0.5, round_to=1)
    prune_channels(model, X[:1], ratio=0.3, round_to=1)
    with pytest.raises(ValueError, match="order of their steps"):
        save(model, tmp_path / "x.safetensors")


def channel_sparse_model(seed=5):
    """ResCNN with channel-sparse layers swapped in by hand (a conv with bias, one without, a Linear)."""
    torch.manual_seed(seed)
    model = random_bn(ResCNN(), seed).eval()
    g = torch.Generator().manual_seed(seed)
    keep = lambda n, k: torch.randperm(n, generator=g)[:k].sort().values  # noqa: E731
    model.block[0] = ChannelSparseConv2d.from_dense(model.block[0], keep(32, 12), keep(32, 20))
    model.stem[0] = ChannelSparseConv2d.from_dense(model.stem[0], keep(32, 24), None)
    model.down[0] = ChannelSparseConv2d.from_dense(model.down[0], keep(64, 40), keep(32, 32))
    model.head[1] = ChannelSparseLinear.from_dense(model.head[1], keep(64, 16), keep(256, 100))
    return model


def test_channel_sparse_layers_round_trip(tmp_path, device):
    model = channel_sparse_model()
    save(model, tmp_path / "cs.safetensors")
    fresh = load(ResCNN().eval().to(device), tmp_path / "cs.safetensors")
    for name in ("stem.0", "block.0", "down.0", "head.1"):
        got, want = fresh.get_submodule(name), model.get_submodule(name)
        assert type(got) is type(want) and got.values.device.type == device.type
        assert torch.equal(got.out_index.cpu(), want.out_index) and torch.equal(got.in_index.cpu(), want.in_index)
    assert fresh.down[0].stride == (2, 2) and fresh.stem[0].bias is None
    with torch.no_grad():
        assert rel_err(fresh(X.to(device)).cpu(), model(X)) < 1e-5


def test_channel_sparse_layers_on_a_pruned_model(tmp_path):
    pruned = pruned_rescnn(seed=6)
    pruned.head[1] = ChannelSparseLinear.from_dense(pruned.head[1], torch.arange(0, pruned.head[1].out_features, 2))
    save(pruned, tmp_path / "p.safetensors")
    fresh = load(ResCNN().eval(), tmp_path / "p.safetensors")
    assert isinstance(fresh.head[1], ChannelSparseLinear) and fresh.head[1].in_features < 256
    with torch.no_grad():
        assert rel_err(fresh(X), pruned(X)) < 1e-5


# ---- tampered files: ValueError, the fresh model unchanged -------------------------------------------------------
def first_param(meta):
    return next(iter(meta["channel_surgery"]["steps"][0]["params"].values()))


def kept(meta, name="stem.0.weight", dim="0"):
    return meta["channel_surgery"]["steps"][0]["params"][name]["keep"][dim]


SURGERY_TAMPERS = {
    "record is a list": (lambda m: m.update(channel_surgery=[1, 2]), "'channel_surgery' must be an object"),
    "record is null": (lambda m: m.update(channel_surgery=None), "'channel_surgery' must be an object"),
    "record is a string": (lambda m: m.update(channel_surgery="stem.0"), "'channel_surgery' must be an object"),
    "wrong version": (lambda m: m["channel_surgery"].update(version=7), "version"),
    "steps not a list": (lambda m: m["channel_surgery"].update(steps={"a": 1}), "version"),
    "step not a dict": (lambda m: m["channel_surgery"]["steps"].append(3), "step 1"),
    "unknown tensor": (lambda m: m["channel_surgery"]["steps"][0]["params"].update(
        {"nope.weight": {"shape": [3], "keep": {}}}), "no parameter or buffer"),
    "shape not a list": (lambda m: first_param(m).update(shape=5), "shape"),
    "keep not a dict": (lambda m: first_param(m).update(keep=[0, 1]), "'keep' must map"),
    "index out of range": (lambda m: kept(m).__setitem__(-1, 32), "strictly increasing"),
    "negative index": (lambda m: kept(m).__setitem__(0, -1), "strictly increasing"),
    "duplicated index": (lambda m: kept(m).__setitem__(1, kept(m)[0]), "strictly increasing"),
    "index not an int": (lambda m: kept(m).__setitem__(0, 0.5), "list of ints"),
    "dim out of range": (lambda m: first_param(m)["keep"].update({"7": [0]}), "dim 7"),
    "fewer kept channels": (lambda m: kept(m).pop(), "does not fit its tensors"),
    # ... and the sizes to match: then the file's tensors no longer fit the cut model
    "fewer kept channels, sizes to match": (lambda m: (kept(m).pop(), m["channel_surgery"]["steps"][0]["modules"][
        "stem.0"].update(out_channels=len(kept(m)))), "stem.0.weight' has shape"),
    "attribute count wrong": (lambda m: m["channel_surgery"]["steps"][0]["modules"]["stem.0"].update(
        out_channels=7), "does not fit its tensors"),
    "attribute not allowed": (lambda m: m["channel_surgery"]["steps"][0]["modules"]["stem.0"].update(
        forward=1), "attributes must be among"),
    "sizes for an untouched module": (lambda m: m["channel_surgery"]["steps"][0]["modules"].update(
        {"head.2": {"out_features": 10}}), "none of its tensors shrinks"),
    "unknown module": (lambda m: m["channel_surgery"]["steps"][0]["modules"].update({"nope": {}}),
                       "no submodule"),
}


def _step(params, modules):
    return {"version": 1, "steps": [{"params": params, "modules": modules}]}


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.cross = nn.MultiheadAttention(8, 2, kdim=6, vdim=6)


SIZE_TAMPERS = {
    "conv rows do not split into its groups": (
        _step({"conv.weight": {"shape": [8, 2, 3, 3], "keep": {"0": list(range(6))}}}, {"conv": {"out_channels": 6}}),
        "groups=4"),
    "GroupNorm channels do not split into its groups": (
        _step({"gn.weight": {"shape": [8], "keep": {"0": list(range(7))}},
               "gn.bias": {"shape": [8], "keep": {"0": list(range(7))}}}, {"gn": {"num_channels": 7}}),
        "num_groups=4"),
    "attention width does not split into its heads": (
        _step({"attn.in_proj_weight": {"shape": [24, 8], "keep": {"1": list(range(7))}}},
              {"attn": {"embed_dim": 7, "kdim": 7, "vdim": 7, "head_dim": 3}}), "num_heads 2"),
    "attention with separate projections": (
        _step({"cross.q_proj_weight": {"shape": [8, 8], "keep": {"0": list(range(4))}}}, {}), "separate q/k/v"),
}


@pytest.mark.parametrize("case", list(SIZE_TAMPERS))
def test_record_whose_sizes_do_not_fit_the_module(case):
    record, message = SIZE_TAMPERS[case]
    model = Grouped()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        apply_channel_surgery(model, record)
    assert unchanged(model, snap)


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io_channels") / "pruned.safetensors"
    save(pruned_rescnn(seed=7), path)
    return path


@pytest.mark.parametrize("case", list(SURGERY_TAMPERS))
def test_tampered_surgery_record(pruned_file, tmp_path, case):
    edit, message = SURGERY_TAMPERS[case]
    assert_load_refused(ResCNN(), rewrite(pruned_file, tmp_path / "bad.safetensors", edit_meta=edit), message)


@pytest.mark.parametrize("case", ["missing tensor", "tensor of the wrong shape", "sparse layer of the wrong size"])
def test_failure_after_the_surgery_undoes_it(pruned_file, tmp_path, case):
    """The surgery is applied first; a later check that fails must leave the dense model as it was."""
    edit_tensors = edit_meta = None
    if case == "missing tensor":
        edit_tensors = lambda t: t.pop("block.1.running_var")  # noqa: E731
    elif case == "tensor of the wrong shape":
        edit_tensors = lambda t: t.update({"head.3.bias": torch.zeros(11)})  # noqa: E731
    else:
        edit_meta = lambda m: m["layers"].append({"name": "head.3", "kind": "channel_linear",  # noqa: E731
                                                  "in_features": 64, "out_features": 10, "bias": True})
    bad = rewrite(pruned_file, tmp_path / "bad.safetensors", edit_tensors, edit_meta)
    assert_load_refused(ResCNN(), bad, "invalid pysparse checkpoint")


def test_truncated_pruned_file(pruned_file, tmp_path):
    data = pruned_file.read_bytes()
    model = ResCNN()
    for cut in (0, 8, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        assert_load_refused(model, bad)


def test_model_with_another_surgery_is_refused(pruned_file):
    model = ResCNN().eval()
    prune_channels(model, X[:1], ratio=0.25, round_to=1)
    assert_load_refused(model, pruned_file, "already carries a channel surgery")


@pytest.fixture(scope="module")
def channel_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io_channels") / "cs.safetensors"
    save(channel_sparse_model(), path)
    return path


def _index(key, value):
    return lambda t: t.update({key: value})


INDEX_TAMPERS = {
    "out index out of range": (_index("head.1.out_index", torch.tensor([0, 5, 64] + list(range(70, 83)),
                                                                       dtype=torch.int32)), "out_index entries"),
    "in index out of range": (lambda t: t["block.0.in_index"].__setitem__(-1, 32), "in_index entries"),
    "negative index": (lambda t: t["stem.0.out_index"].__setitem__(0, -3), "out_index entries"),
    "duplicated index": (lambda t: t["down.0.out_index"].__setitem__(1, t["down.0.out_index"][0]),
                         "strictly increasing"),
    "unsorted index": (lambda t: t.update({"head.1.in_index": t["head.1.in_index"].flip(0).contiguous()}),
                       "strictly increasing"),
    "int64 index": (lambda t: t.update({"head.1.out_index": t["head.1.out_index"].long()}), "int32"),
    "float index": (lambda t: t.update({"block.0.in_index": t["block.0.in_index"].float()}), "int32"),
    "2-D index": (lambda t: t.update({"head.1.out_index": t["head.1.out_index"].reshape(2, 8)}), "out_index"),
    "index count != values": (lambda t: t.update({"head.1.out_index": t["head.1.out_index"][:-1].contiguous()}),
                              "values must have shape"),
    "values not float": (lambda t: t.update({"head.1.values": t["head.1.values"].to(torch.int32)}), "values"),
    "missing index": (lambda t: t.pop("stem.0.in_index"), "missing"),
    "bias wrong shape": (_index("head.1.bias", torch.zeros(63)), "bias"),
}
LAYER_TAMPERS = {
    "geometry mismatch": (lambda m: next(e for e in m["layers"] if e["name"] == "head.1").update(in_features=9),
                          "in_features"),
    "conv stride mismatch": (lambda m: next(e for e in m["layers"] if e["name"] == "down.0").update(stride=[1, 1]),
                             "stride"),
    "padding not a pair": (lambda m: next(e for e in m["layers"] if e["name"] == "down.0").update(padding="same"),
                           "padding"),
    "unknown kind": (lambda m: m["layers"][0].update(kind="channel_conv3d"), "kind"),
    "kind onto the wrong layer": (lambda m: next(e for e in m["layers"] if e["name"] == "head.1").update(
        name="block.1"), "BatchNorm2d"),
}


@pytest.mark.parametrize("case", list(INDEX_TAMPERS) + list(LAYER_TAMPERS))
def test_tampered_channel_sparse_layers(channel_file, tmp_path, case):
    if case in INDEX_TAMPERS:
        edit, message = INDEX_TAMPERS[case]
        bad = rewrite(channel_file, tmp_path / "bad.safetensors", edit_tensors=edit)
    else:
        edit, message = LAYER_TAMPERS[case]
        bad = rewrite(channel_file, tmp_path / "bad.safetensors", edit_meta=edit)
    assert_load_refused(ResCNN(), bad, message)


def test_channel_conv_needs_a_zero_padded_dense_conv(channel_file):
    model = ResCNN()
    model.stem[0] = nn.Conv2d(3, 32, 3, padding=1, bias=False, padding_mode="reflect")
    assert_load_refused(model, channel_file, "zero padding")

