"""Packed checkpoints: safetensors for every tensor of the model, JSON metadata for its pysparse layers.

``save(model, path)`` writes the whole state dict (dense parts included) and, under the safetensors metadata
key ``"pysparse"``, which layers are sparse and their geometry. ``load(model, path)`` takes a freshly built
dense model of the same architecture, swaps those layers for SparseLinear / SparseConv2d, and loads every
tensor. Nothing is unpickled; the file is checked completely (header, metadata schema, every index array,
every shape) before the model is changed or any kernel runs, and a malformed file raises ValueError.
"""
from __future__ import annotations

import json
import os

import safetensors
import safetensors.torch
import torch
from torch import nn

from ._build_info import VERSION
from .formats import BlockSparseWeight
from .nn import SparseConv2d, SparseLinear
from .nn.sparse_conv import _padding_spec

__all__ = ["save", "load"]

_META_KEY = "pysparse"
_FORMAT_VERSION = 1


# ---- save ---------------------------------------------------------------------------------------------------
def _sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level pysparse layers by name (a SparseConv2d's inner SparseLinear is part of the conv)."""
    modules = dict(model.named_modules())
    inner = {id(m.linear) for m in modules.values() if isinstance(m, SparseConv2d)}
    layers = {n: m for n, m in modules.items()
              if isinstance(m, SparseConv2d) or (isinstance(m, SparseLinear) and id(m) not in inner)}
    if "" in layers:
        raise ValueError(f"model is itself a {type(model).__name__}: save a module that contains it (load swaps "
                         f"layers inside the model it is given)")
    return layers


def _layer_meta(name: str, m: nn.Module) -> dict:
    if isinstance(m, SparseConv2d):
        return {"name": name, "kind": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "padding_mode": m.padding_mode, "block_size": list(m.block_size),
                "bias": m.bias is not None, "trainable": isinstance(m.linear.values, nn.Parameter)}
    return {"name": name, "kind": "linear", "in_features": m.in_features, "out_features": m.out_features,
            "block_size": list(m.block_size), "bias": m.bias is not None,
            "trainable": isinstance(m.values, nn.Parameter)}


def save(model: nn.Module, path) -> None:
    """Write ``model``'s state dict and its pysparse layers' geometry to a safetensors file at ``path``.

    Tensors that share memory (tied weights) are stored once and recorded as aliases.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor: cannot be saved")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        view = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if ptr is not None and view in views:
            aliases[key] = views[view]
            continue
        if ptr is not None:
            views[view] = key
        # safetensors refuses tensors that overlap in memory: other views of a used storage get their own copy.
        shared = ptr is not None and ptr in storages
        storages.add(ptr)
        t = t.detach().to("cpu")
        tensors[key] = t.clone() if shared else t.contiguous()
    meta = {"format_version": _FORMAT_VERSION, "pysparse_version": VERSION,
            "layers": [_layer_meta(n, m) for n, m in _sparse_layers(model).items()], "aliases": aliases}
    safetensors.torch.save_file(tensors, os.fspath(path), metadata={_META_KEY: json.dumps(meta), "format": "pt"})


# ---- load: schema checks --------------------------------------------------------------------------------------
class _Bad(ValueError):
    pass


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(entry: dict, key: str, check, expected: str):
    if key not in entry:
        raise _Bad(f"layer entry {entry.get('name', '?')!r} lacks {key!r}")
    value = entry[key]
    if not check(value):
        raise _Bad(f"layer {entry.get('name', '?')!r}: {key} must be {expected}, got {value!r}")
    return value


def _pos_pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v)


def _check_entry(entry) -> dict:
    if not isinstance(entry, dict):
        raise _Bad(f"each layer entry must be an object, got {type(entry).__name__}")
    _field(entry, "name", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    kind = _field(entry, "kind", lambda v: v in ("linear", "conv2d"), "'linear' or 'conv2d'")
    _field(entry, "block_size", _pos_pair, "a pair of ints >= 1")
    _field(entry, "bias", lambda v: isinstance(v, bool), "a bool")
    _field(entry, "trainable", lambda v: isinstance(v, bool), "a bool")
    if kind == "linear":
        for key in ("in_features", "out_features"):
            _field(entry, key, lambda v: _is_int(v) and v >= 0, "an int >= 0")
    else:
        for key in ("in_channels", "out_channels"):
            _field(entry, key, lambda v: _is_int(v) and v >= 1, "an int >= 1")
        for key in ("kernel_size", "stride", "dilation"):
            _field(entry, key, _pos_pair, "a pair of ints >= 1")
        _field(entry, "padding", lambda v: v in ("valid", "same") or (
            isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v)),
            "'valid', 'same' or a pair of ints >= 0")
        _field(entry, "padding_mode", lambda v: v in ("zeros", "reflect", "replicate", "circular"),
               "a padding mode of nn.Conv2d")
    return entry


def _read_meta(f) -> dict:
    raw = (f.metadata() or {}).get(_META_KEY)
    if raw is None:
        raise _Bad(f"no {_META_KEY!r} metadata: not written by pysparse.save")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Bad(f"{_META_KEY!r} metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise _Bad(f"format_version must be {_FORMAT_VERSION}, got {got!r}")
    layers, aliases = meta.get("layers"), meta.get("aliases")
    if not isinstance(layers, list):
        raise _Bad(f"'layers' must be a list, got {type(layers).__name__}")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in aliases.items()):
        raise _Bad("'aliases' must map tensor names to tensor names")
    meta["layers"] = [_check_entry(e) for e in layers]
    names = [e["name"] for e in meta["layers"]]
    if len(set(names)) != len(names):
        raise _Bad("a layer is listed twice")
    return meta


# ---- load: building the layers --------------------------------------------------------------------------------
def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise _Bad(msg)


def _target(model: nn.Module, entry: dict) -> nn.Module:
    """The module the entry replaces, checked to have the entry's geometry."""
    name = entry["name"]
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise _Bad(f"layer {name!r} is not in the model") from None
    if entry["kind"] == "linear":
        _expect(isinstance(target, (nn.Linear, SparseLinear)),
                f"layer {name!r} is a {type(target).__name__} in the model, the checkpoint has a Linear")
        got = (target.in_features, target.out_features, target.bias is not None)
        want = (entry["in_features"], entry["out_features"], entry["bias"])
        _expect(got == want, f"layer {name!r}: (in_features, out_features, bias) is {got} in the model, "
                             f"{want} in the checkpoint")
    else:
        _expect(isinstance(target, (nn.Conv2d, SparseConv2d)),
                f"layer {name!r} is a {type(target).__name__} in the model, the checkpoint has a Conv2d")
        _expect(getattr(target, "groups", 1) == 1, f"layer {name!r} has groups={getattr(target, 'groups', 1)}")
        got = (target.in_channels, target.out_channels, tuple(target.kernel_size), tuple(target.stride),
               _padding_spec(target.padding), tuple(target.dilation), target.padding_mode, target.bias is not None)
        pad = entry["padding"]
        want = (entry["in_channels"], entry["out_channels"], tuple(entry["kernel_size"]), tuple(entry["stride"]),
                pad if isinstance(pad, str) else tuple(pad), tuple(entry["dilation"]), entry["padding_mode"],
                entry["bias"])
        _expect(got == want, f"layer {name!r}: (in, out, kernel, stride, padding, dilation, padding_mode, bias) is "
                             f"{got} in the model, {want} in the checkpoint")
    return target


def _build(entry: dict, target: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    name = entry["name"]
    prefix = f"{name}.linear." if entry["kind"] == "conv2d" else f"{name}."
    parts = {}
    for key in ("values", "crow_indices", "col_indices") + (("bias",) if entry["bias"] else ()):
        _expect(prefix + key in tensors, f"layer {name!r}: tensor {prefix + key!r} is missing")
        parts[key] = tensors[prefix + key]
    if entry["kind"] == "linear":
        shape = (entry["out_features"], entry["in_features"])
    else:
        kh, kw = entry["kernel_size"]
        shape = (entry["out_channels"], entry["in_channels"] * kh * kw)
    values = parts["values"]
    _expect(values.dim() == 3 and list(values.shape[1:]) == entry["block_size"],
            f"layer {name!r}: values must be [nnz, {entry['block_size'][0]}, {entry['block_size'][1]}], "
            f"got {tuple(values.shape)}")
    try:
        weight = BlockSparseWeight(values, parts["crow_indices"], parts["col_indices"], shape)  # validates
        bias = parts.get("bias")
        if entry["kind"] == "linear":
            new = SparseLinear(weight, bias, trainable=entry["trainable"])
        else:
            new = SparseConv2d(weight, bias, in_channels=entry["in_channels"], kernel_size=entry["kernel_size"],
                               stride=entry["stride"], padding=entry["padding"], dilation=entry["dilation"],
                               padding_mode=entry["padding_mode"], trainable=entry["trainable"])
    except (TypeError, ValueError) as exc:
        raise _Bad(f"layer {name!r}: {exc}") from None
    ref = next(iter(target.parameters()), None)
    if ref is None:
        ref = next(iter(target.buffers()))
    dtype = ref.dtype if ref.is_floating_point() else values.dtype
    return new.to(device=ref.device, dtype=dtype).train(target.training)


def _check_dense_part(model: nn.Module, new_layers: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the swapped model expects is in the file with its shape, and nothing else is."""
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(f"{n}.") for n in new_layers)}
    for n, layer in new_layers.items():
        expected.update({f"{n}.{k}": v for k, v in layer.state_dict().items()})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    _expect(not missing, f"tensors missing from the file: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    _expect(not unexpected, f"tensors the model does not have: {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
    for k, want in expected.items():
        got = tensors[k]
        _expect(tuple(got.shape) == tuple(want.shape),
                f"tensor {k!r} has shape {tuple(got.shape)} in the file, {tuple(want.shape)} in the model")
        _expect(got.is_floating_point() == want.is_floating_point(),
                f"tensor {k!r} is {got.dtype} in the file, {want.dtype} in the model")


def load(model: nn.Module, path) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (a freshly built dense model), in place.

    The layers that were sparse when saved are replaced by SparseLinear / SparseConv2d (on the device and dtype
    of the layer they replace), then every tensor is loaded. Returns ``model``. Raises ValueError, leaving the
    model unchanged, if the file is truncated, tampered with, or does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            meta = _read_meta(f)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except _Bad as exc:
        raise ValueError(f"{path}: invalid pysparse checkpoint: {exc}") from None
    except safetensors.SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        for key, source in meta["aliases"].items():
            _expect(key not in tensors, f"alias {key!r} is also stored as a tensor")
            _expect(source in tensors, f"alias {key!r} points to {source!r}, which is not in the file")
            tensors[key] = tensors[source]
        new_layers = {e["name"]: _build(e, _target(model, e), tensors) for e in meta["layers"]}
        _expect(not any(a != b and b.startswith(f"{a}.") for a in new_layers for b in new_layers),
                "sparse layers are nested in one another")
        _check_dense_part(model, new_layers, tensors)
    except _Bad as exc:
        raise ValueError(f"{path}: invalid pysparse checkpoint: {exc}") from None
    for name, layer in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    model.load_state_dict(tensors, strict=True)
    return model
