"""pysparse.io save/load: round trip into a fresh dense model; damaged or tampered files raise ValueError."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from checkpoint_tools import assert_load_refused, rewrite
from pysparse import sparsify
from pysparse.io import load, save
from pysparse.nn import SparseConv2d, SparseLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 32)
        self.conv = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.pw = nn.Conv2d(64, 32, 1)
        self.fc = nn.Linear(32 * 4, 48)
        self.out = nn.Linear(48, 20)
        self.tied = nn.Linear(32, 20, bias=False)
        self.tied.weight = self.embed.weight   # tied weights: stored once, restored into both

    def forward(self, tokens):
        e = self.embed(tokens)                                          # [B, 4, 32]
        img = e.transpose(1, 2).reshape(-1, 32, 2, 2)
        h = self.pw(torch.relu(self.bn(self.conv(img)))).flatten(1)    # [B, 128]
        return self.out(torch.relu(self.fc(h))) + self.tied(e.mean(1))


def _sparse_net(trainable=False):
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.conv.weight[:32] = 0
        net.pw.weight[16:] = 0
        net.fc.weight[:, 64:] = 0
        net.fc.weight[:16] = 0
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net, sparsify(net, block_size=(16, 16), trainable=trainable)


TOKENS = torch.tensor([[1, 5, 7, 19], [0, 2, 3, 4]])


@pytest.fixture
def saved(tmp_path):
    net, sparse = _sparse_net()
    path = tmp_path / "model.safetensors"
    save(sparse, path)
    return net, sparse, path


def test_round_trip(saved):
    net, sparse, path = saved
    assert {r.name for r in sparse.sparsify_report.swapped} == {"conv", "pw", "fc"}
    fresh = Net().eval()
    assert load(fresh, path) is fresh
    assert isinstance(fresh.conv, SparseConv2d) and isinstance(fresh.pw, SparseConv2d)
    assert isinstance(fresh.fc, SparseLinear) and type(fresh.out) is nn.Linear
    assert fresh.tied.weight is fresh.embed.weight
    assert torch.equal(fresh(TOKENS), sparse(TOKENS))
    assert ((fresh(TOKENS) - net(TOKENS)).abs().max() / net(TOKENS).abs().max()) < 1e-5
    for k, v in sparse.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_round_trip_trainable_and_into_sparse_model(tmp_path):
    _, sparse = _sparse_net(trainable=True)
    path = tmp_path / "t.safetensors"
    save(sparse, path)
    fresh = load(Net(), path)
    assert isinstance(fresh.fc.values, nn.Parameter)
    # Loading again into the already-swapped model works too (same geometry).
    assert torch.equal(load(fresh, path).eval()(TOKENS), sparse(TOKENS))


def test_load_onto_device(saved, device):
    _, sparse, path = saved
    fresh = load(Net().eval().to(device), path)
    assert fresh.fc.values.device.type == device.type and fresh.conv.linear.col_indices.device.type == device.type
    assert ((fresh(TOKENS.to(device)).cpu() - sparse(TOKENS)).abs().max() / sparse(TOKENS).abs().max()) < 1e-5


def test_never_unpickles(saved, monkeypatch):
    _, sparse, path = saved

    def refuse(*args, **kwargs):
        raise AssertionError("load() tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = load(Net().eval(), path)
    assert torch.equal(fresh(TOKENS), sparse(TOKENS))


def test_pickle_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(Net().state_dict(), path)
    assert_load_refused(Net(), path, "not a readable safetensors file")


def test_truncated_files(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    model = Net()
    for cut in (0, 5, 8, 40, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        assert_load_refused(model, bad)


def test_random_byte_flips_never_crash(saved, tmp_path):
    """Flipped bytes anywhere give ValueError or (values region) a model that loads; nothing else."""
    _, _, path = saved
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        bad = bytearray(data)
        limit = 8 + header_len if trial % 2 == 0 else len(data)   # half the flips in the JSON header
        for pos in torch.randint(0, limit, (3,), generator=g).tolist():
            bad[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        p = tmp_path / "flip.safetensors"
        p.write_bytes(bytes(bad))
        try:
            load(Net(), p)
        except ValueError:
            pass


def _set(key, value):
    def edit(t):
        t[key] = value
    return edit


def _layer(meta, name):
    return next(e for e in meta["layers"] if e["name"] == name)


TAMPERS = {
    "col index out of range": (_set("fc.col_indices", torch.tensor([0, 1, 2, 9, 0, 1, 2, 3], dtype=torch.int32)),
                               None, "out of range"),
    "col indices not increasing": (_set("fc.col_indices", torch.tensor([0, 2, 1, 3, 0, 1, 2, 3],
                                                                       dtype=torch.int32)), None, "increasing"),
    "crow decreasing": (_set("fc.crow_indices", torch.tensor([0, 5, 2, 8], dtype=torch.int32)), None,
                        "non-decreasing"),
    "crow wrong length": (_set("fc.crow_indices", torch.tensor([0, 4, 8], dtype=torch.int32)), None, "entries"),
    "crow end != nnz": (_set("fc.crow_indices", torch.tensor([0, 0, 4, 7], dtype=torch.int32)), None,
                        "number of blocks"),
    "int64 indices": (lambda t: t.update({"fc.col_indices": t["fc.col_indices"].long()}), None, "int32"),
    "values wrong block shape": (lambda t: t.update({"fc.values": t["fc.values"][:, :8].contiguous()}), None,
                                 "values must be"),
    "values not float": (lambda t: t.update({"fc.values": t["fc.values"].to(torch.int32)}), None, "dtype"),
    "conv indices out of range": (_set("conv.linear.col_indices", torch.full((36,), 99, dtype=torch.int32)), None,
                                  "out of range"),
    "missing tensor": (lambda t: t.pop("fc.col_indices"), None, "missing"),
    "missing dense tensor": (lambda t: t.pop("bn.running_var"), None, "missing"),
    "extra tensor": (_set("surprise", torch.zeros(3)), None, "does not have"),
    "dense shape mismatch": (_set("out.weight", torch.zeros(20, 47)), None, "shape"),
    "bias wrong shape": (_set("fc.bias", torch.zeros(47)), None, "bias"),
    "no pysparse metadata": (None, lambda m: {"format": "pt"}, "metadata"),
    "metadata not json": (None, lambda m: {"pysparse": "{not json", "format": "pt"}, "JSON"),
    "metadata not a dict": (None, lambda m: {"pysparse": "[1, 2]", "format": "pt"}, "format_version"),
    "wrong format version": (None, lambda m: m.update(format_version=99), "format_version"),
    "layer not in model": (None, lambda m: _layer(m, "fc").update(name="nope"), "not in the model"),
    "layer kind mismatch": (None, lambda m: _layer(m, "fc").update(name="bn"), "BatchNorm2d"),
    "geometry mismatch": (None, lambda m: _layer(m, "fc").update(in_features=100), "in_features"),
    "conv geometry mismatch": (None, lambda m: _layer(m, "conv").update(stride=[2, 2]), "stride"),
    "bad field type": (None, lambda m: _layer(m, "fc").update(block_size=[16, "x"]), "block_size"),
    "negative size": (None, lambda m: _layer(m, "fc").update(out_features=-3), "out_features"),
    "missing field": (None, lambda m: _layer(m, "fc").pop("bias"), "bias"),
    "duplicate layer": (None, lambda m: m["layers"].append(dict(_layer(m, "fc"))), "twice"),
    "alias to nowhere": (None, lambda m: m["aliases"].update({"tied.weight": "nothing"}), "alias"),
    "layers not a list": (None, lambda m: m.update(layers={"a": 1}), "list"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_files(saved, tmp_path, case):
    _, _, path = saved
    edit_tensors, edit_meta, message = TAMPERS[case]
    assert_load_refused(Net(), rewrite(path, tmp_path / "bad.safetensors", edit_tensors, edit_meta), message)


def test_save_rejects_bare_layer_and_non_module(tmp_path):
    layer = SparseLinear.from_dense(nn.Linear(32, 32))
    with pytest.raises(ValueError, match="save a module that contains it"):
        save(layer, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        save({"a": 1}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load("model", tmp_path / "x.safetensors")
