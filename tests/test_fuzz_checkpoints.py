"""Fuzzing saved checkpoints with hypothesis (the op arguments: test_fuzz.py): ``pysparse.save`` output with its
bytes (safetensors header, lengths, truncation), its metadata JSON (any field replaced, deleted or added) or its
tensors (index entries, int32 wrap-around, dtypes, shapes, missing and extra ones) changed loads into a fresh model
either with every sparse layer computing what its dense equivalent does, or not at all: a ValueError naming the file,
the model left as it was built."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from checkpoint_tools import rewrite, snapshot, unchanged
from hypothesis import event, given
from hypothesis import strategies as st
from test_fuzz import fuzz_settings
from torch import nn

import pysparse
from pysparse.nn import ChannelSparseConv2d, ChannelSparseLinear, SparseConv2d, SparseLinear


class _Net(nn.Module):
    """One layer of each packed kind once converted: block-sparse conv and linear, channel-sparse conv and linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.cconv = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.cfc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.cconv(torch.relu(self.conv(x)))
        return self.cfc(torch.relu(self.fc(x.flatten(1))))


def _packed_net() -> nn.Module:
    net = _Net().eval()
    with torch.no_grad():
        net.conv.weight[:8] = 0       # the first block row of the tap-major [16, 72] matrix
        net.fc.weight[:, 32:96] = 0
    net = pysparse.sparsify(net, block_size=(8, 8), min_sparsity=0.2)
    assert isinstance(net.conv, SparseConv2d) and isinstance(net.fc, SparseLinear)
    net.cconv = ChannelSparseConv2d.from_dense(net.cconv, out_index=torch.tensor([0, 2, 3, 7]),
                                               in_index=torch.arange(0, 16, 2))
    net.cfc = ChannelSparseLinear.from_dense(net.cfc, out_index=torch.tensor([1, 4, 5, 9]),
                                             in_index=torch.tensor([0, 3, 8, 9, 20, 31]))
    return net


_X = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
_PACKED = (SparseLinear, SparseConv2d, ChannelSparseLinear, ChannelSparseConv2d)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    net = _packed_net()
    path = tmp_path_factory.mktemp("fuzz") / "net.safetensors"
    pysparse.save(net, path)
    with torch.no_grad():
        return path, net(_X)


def _loads_consistently(path, want: torch.Tensor | None) -> None:
    """Load ``path`` into a fresh model: a ValueError naming the file leaves it as built; a load that succeeds gives
    layers that each compute what their dense equivalent does (``want``: the whole output, for an unchanged file)."""
    model = _Net().eval()
    snap = snapshot(model)
    try:
        pysparse.load(model, path)
    except ValueError as exc:
        assert str(path) in str(exc) and ("invalid pysparse checkpoint" in str(exc) or "safetensors" in str(exc)), exc
        assert unchanged(model, snap), "a refused load changed the model"
        event("refused")   # --hypothesis-show-statistics counts refused and loaded cases
        return
    event("loaded")
    packed = [m for m in model.modules() if isinstance(m, _PACKED)]
    assert packed, "a load that succeeds swaps the sparse layers in"
    with torch.no_grad():
        for m in packed:
            dense = m.to_linear() if isinstance(m, (SparseLinear, ChannelSparseLinear)) else m.to_conv2d()
            x = torch.randn(3, m.in_features) if hasattr(m, "in_features") else torch.randn(2, m.in_channels, 5, 5)
            torch.testing.assert_close(m(x), dense(x), rtol=1e-4, atol=1e-4)
        if want is not None:
            torch.testing.assert_close(model(_X), want, rtol=0, atol=0)


# Values a fuzzed JSON field or index entry takes: wrong types, boundaries, int32 and int64 overflow.
_JSON_VALUES = st.sampled_from([None, True, False, 0, 1, -1, 3, 2**31, 2**63, 1.5, float("nan"), "", "x", "linear",
                                [], [1, 1], [0, 0], [-1, 8], [8, 8, 8], {}, {"name": "fc"}])
_INDEX_VALUES = st.sampled_from([-1, 1, 2, 9, 16, 31, 2**31 - 1, -(2**31)])
_INDEX_SUFFIXES = ("crow_indices", "col_indices", "out_index", "in_index")


def _json_paths(node, path=()):
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _json_paths(child, (*path, key))


def _edit_meta(draw, meta: dict):
    paths = [p for p in _json_paths(meta) if p]
    path = draw(st.sampled_from(paths))
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["replace", "delete", "add_key", "raw"]))
    if how == "raw":   # the metadata string itself: not JSON, other JSON, or absent
        raw = draw(st.sampled_from(["", "{", "[]", "null", '{"format_version": 1}', json.dumps(meta)[:-3], None]))
        return {"format": "pt"} if raw is None else {"pysparse": raw, "format": "pt"}
    if how == "delete":
        del parent[path[-1]]
    elif how == "add_key" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["extra", "aliases", "format"]))] = draw(_JSON_VALUES)
    else:
        parent[path[-1]] = draw(_JSON_VALUES)
    return None


def _edit_tensors(draw, tensors: dict) -> None:
    name = draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    if name.endswith(_INDEX_SUFFIXES) and t.numel() and draw(st.booleans()):
        how = draw(st.sampled_from(["entry", "reverse", "int64_wrap", "dtype"]))
        t = t.clone()
        if how == "entry":
            t[draw(st.integers(0, t.numel() - 1))] = draw(_INDEX_VALUES)
        elif how == "reverse":
            t = t.flip(0).contiguous()
        elif how == "int64_wrap":   # 2**32 + i would wrap to the valid i if cast to int32 blindly
            t = t.long()
            t[draw(st.integers(0, t.numel() - 1))] += 2**32
        else:
            t = t.to(draw(st.sampled_from([torch.int64, torch.int16, torch.uint8, torch.float32, torch.bool])))
        tensors[name] = t
        return
    how = draw(st.sampled_from(["dtype", "drop_last", "append", "unsqueeze", "empty", "delete", "extra"]))
    if how == "dtype":
        tensors[name] = t.to(draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                                   torch.int64, torch.bool, torch.uint8])))
    elif how == "drop_last" and t.dim():
        tensors[name] = t[:-1].contiguous()
    elif how == "append" and t.dim():
        tensors[name] = torch.cat([t, t[-1:]])
    elif how == "unsqueeze":
        tensors[name] = t.unsqueeze(0).contiguous()
    elif how == "empty":
        tensors[name] = t.new_zeros(0)
    elif how == "delete":
        del tensors[name]
    else:
        tensors[f"{name}.extra"] = t.clone()


def _edit_bytes(draw, data: bytes) -> bytes:
    header_len = struct.unpack("<Q", data[:8])[0]
    how = draw(st.sampled_from(["length", "header_byte", "truncate", "append", "tensor_byte"]))
    if how == "length":
        new = draw(st.sampled_from([0, 1, header_len - 1, header_len + 1, len(data), 2**32, 2**63, 2**64 - 1]))
        return struct.pack("<Q", new) + data[8:]
    if how == "header_byte":   # inside the JSON header: names, dtypes, shapes, offsets, the metadata string
        i = draw(st.integers(8, 8 + header_len - 1))
        return data[:i] + bytes([draw(st.sampled_from(list(b'0123456789"{}[],:-eE \x00\xff')))]) + data[i + 1:]
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "append":
        return data + bytes(draw(st.integers(1, 64)))
    i = draw(st.integers(8 + header_len, len(data) - 1))   # tensor bytes: index entries become arbitrary
    return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]


@fuzz_settings(300)
@given(data=st.data())
def test_fuzz_checkpoints(checkpoint, tmp_path_factory, data):
    path, want = checkpoint
    out = tmp_path_factory.getbasetemp() / "fuzzed.safetensors"
    layer = data.draw(st.sampled_from(["none", "meta", "tensors", "bytes"]), label="what")
    if layer == "none":
        _loads_consistently(path, want)
        return
    if layer == "bytes":
        out.write_bytes(_edit_bytes(data.draw, path.read_bytes()))
    elif layer == "meta":
        rewrite(path, out, edit_meta=lambda meta: _edit_meta(data.draw, meta))
    else:
        rewrite(path, out, edit_tensors=lambda tensors: _edit_tensors(data.draw, tensors))
    _loads_consistently(out, None)
