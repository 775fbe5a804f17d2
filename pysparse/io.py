"""Packed checkpoints: safetensors for every tensor of the model, JSON metadata for its pysparse layers.

``save(model, path)`` writes the whole state dict (dense parts included) and, under the safetensors metadata key
``"pysparse"``, which layers are sparse (block-sparse SparseLinear / SparseConv2d, unstructured
UnstructuredSparseLinear, channel-sparse ChannelSparseLinear / ChannelSparseConv2d) with their geometry, and the
channel surgery ``prune_channels`` applied (the kept channels of every tensor it shrank), and the blocks whose
forward ``sparsify(fuse_activations=True)`` rewrote (what each fused: their layers are saved unfused). ``load(model,
path)`` takes a freshly built dense model of the same architecture, re-applies that surgery, swaps the sparse layers
in, loads every tensor, and rewrites those blocks again (checked to fuse exactly what was recorded). Nothing is
unpickled; the file is checked completely (header, metadata schema, surgery record, every index array, every
shape) before any kernel runs, and a malformed file raises ValueError with the model left as it was (the surgery,
applied first because the other checks need the pruned shapes, is undone).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import safetensors
import safetensors.torch
import torch
from torch import nn

from ._build_info import VERSION
from .formats import BlockSparseWeight, ChannelSparseWeight, UnstructuredSparseWeight
from .nn import ChannelSparseConv2d, ChannelSparseLinear, SparseConv2d, SparseLinear, UnstructuredSparseLinear
from .transforms.activation_fusion import activation_name
from .transforms.attention_switch import ATTENTION_NAME, attention_implementation, use_pysparse_attention
from .transforms.forward_fusion import ForwardFusion, apply_forward_fusions, plan_forward_fusions, recorded_fusions
from .nn.sparse_conv import _padding_spec
from .ops import ACTIVATIONS
from .prune import apply_channel_surgery, channel_surgery_record

__all__ = ["save", "load"]

_META_KEY = "pysparse"
_FORMAT_VERSION = 1
_SURGERY_KEY = "channel_surgery"
_FORWARD_KEY = "forward_fusions"
_ATTENTION_KEY = "attention"
# kind in the metadata -> (the dense layer it replaces, the pysparse layer)
_KINDS = {"linear": (nn.Linear, SparseLinear), "conv2d": (nn.Conv2d, SparseConv2d),
          "channel_linear": (nn.Linear, ChannelSparseLinear), "channel_conv2d": (nn.Conv2d, ChannelSparseConv2d)}


# ---- save ---------------------------------------------------------------------------------------------------
def _sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level pysparse layers by name (a SparseConv2d's inner SparseLinear is part of the conv)."""
    modules = dict(model.named_modules())
    inner = {id(m.linear) for m in modules.values() if isinstance(m, SparseConv2d)}
    packed = tuple(layer for _, layer in _KINDS.values())
    layers = {n: m for n, m in modules.items() if isinstance(m, packed) and id(m) not in inner}
    if "" in layers:
        raise ValueError(f"model is itself a {type(model).__name__}: save a module that contains it (load swaps "
                         f"layers inside the model it is given)")
    return layers


def _join(block: str, name: str) -> str:
    return f"{block}.{name}" if block else name


def _forward_fusions(model: nn.Module) -> dict[str, list[dict]]:
    """The blocks whose forward sparsify rewrote (pysparse.transforms.forward_fusion), by name: what each fused."""
    blocks = {name: recorded_fusions(m) for name, m in model.named_modules()}
    return {name: [asdict(f) for f in fusions] for name, fusions in blocks.items() if fusions}


def _layer_meta(name: str, m: nn.Module, fused_in_forward: bool = False) -> dict:
    if isinstance(m, ChannelSparseLinear):
        return {"name": name, "kind": "channel_linear", "in_features": m.in_features,
                "out_features": m.out_features, "bias": m.bias is not None}
    if isinstance(m, ChannelSparseConv2d):
        return {"name": name, "kind": "channel_conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                "dilation": list(m.dilation), "bias": m.bias is not None}
    if isinstance(m, SparseConv2d):
        entry = {"name": name, "kind": "conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                 "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                 "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                 "dilation": list(m.dilation), "padding_mode": m.padding_mode, "block_size": list(m.block_size),
                 "bias": m.bias is not None, "trainable": isinstance(m.linear.values, nn.Parameter)}
    else:
        entry = {"name": name, "kind": "linear", "in_features": m.in_features, "out_features": m.out_features,
                 "block_size": list(m.block_size), "bias": m.bias is not None,
                 "trainable": isinstance(m.values, nn.Parameter)}
        if isinstance(m, UnstructuredSparseLinear):  # absent for blocks: files of block layers read as before
            entry["format"] = "unstructured"
    # Absent without one (files of layers without one read as before), and for an activation a rewritten forward
    # gave it: that is redone at load from the block's record, and a reader that does not know the record gets
    # the unfused layer, which the block's original forward completes.
    if m.activation is not None and not fused_in_forward:
        entry["activation"] = m.activation
        entry["activation_source"] = m.activation_source
    return entry


def _surgery_record(model: nn.Module) -> dict | None:
    """The channel surgery applied to ``model``, as one record named from ``model`` (None if none).

    ``prune_channels`` records the surgery on the module it pruned, so a pruned submodule's record is renamed into
    the model's namespace. Records on two nested modules are refused: the order of their steps is not known.
    """
    found = [(n, r) for n, m in model.named_modules() if (r := channel_surgery_record(m)) is not None]
    for a, _ in found:
        for b, _ in found:
            if a != b and (a == "" or b.startswith(f"{a}.")):
                raise ValueError(f"channel surgery is recorded on {a or 'the model'!r} and on {b!r} inside it "
                                 f"(prune_channels was called on both): the order of their steps is not known, "
                                 f"so no checkpoint could replay them; prune channels through one module")
    if not found:
        return None

    def rename(prefix: str, names: dict) -> dict:
        return {f"{prefix}.{q}" if prefix and q else prefix or q: v for q, v in names.items()}

    return {"version": found[0][1]["version"],
            "steps": [{"params": rename(prefix, step["params"]), "modules": rename(prefix, step["modules"])}
                      for prefix, record in found for step in record["steps"]]}


def save(model: nn.Module, path) -> None:
    """Write ``model``'s state dict, its pysparse layers' geometry and its channel surgery (what
    ``prune_channels`` removed) to a safetensors file at ``path``.

    Tensors that share memory (tied weights) are stored once and recorded as aliases.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    surgery = _surgery_record(model)
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
    forward = _forward_fusions(model)
    in_forward = {_join(b, f["layer"]) for b, fs in forward.items() for f in fs}
    meta = {"format_version": _FORMAT_VERSION, "pysparse_version": VERSION,
            "layers": [_layer_meta(n, m, n in in_forward) for n, m in _sparse_layers(model).items()],
            "aliases": aliases}
    if surgery is not None:
        meta[_SURGERY_KEY] = surgery
    if forward:
        meta[_FORWARD_KEY] = forward
    if attention_implementation(model) == ATTENTION_NAME:
        meta[_ATTENTION_KEY] = ATTENTION_NAME   # load switches the fresh model's attention back
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
    kind = _field(entry, "kind", lambda v: isinstance(v, str) and v in _KINDS, f"one of {sorted(_KINDS)}")
    _field(entry, "bias", lambda v: isinstance(v, bool), "a bool")
    if kind in ("linear", "conv2d"):
        _field(entry, "block_size", _pos_pair, "a pair of ints >= 1")
        _field(entry, "trainable", lambda v: isinstance(v, bool), "a bool")
        if "activation" in entry:
            _field(entry, "activation", lambda v: v in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}")
            _field(entry, "activation_source", lambda v: v is None or (isinstance(v, str) and v != ""),
                   "null or a module name")
    if "format" in entry:
        _field(entry, "format", lambda v: v == "unstructured" and kind == "linear" and entry["block_size"] == [1, 1],
               "'unstructured' (a linear layer with block_size [1, 1])")
    if kind in ("linear", "channel_linear"):
        for key in ("in_features", "out_features"):
            _field(entry, key, lambda v: _is_int(v) and v >= 0, "an int >= 0")
        return entry
    for key in ("in_channels", "out_channels"):
        _field(entry, key, lambda v: _is_int(v) and v >= 1, "an int >= 1")
    for key in ("kernel_size", "stride", "dilation"):
        _field(entry, key, _pos_pair, "a pair of ints >= 1")
    pair = lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v)  # noqa: E731
    if kind == "channel_conv2d":
        _field(entry, "padding", pair, "a pair of ints >= 0")
        return entry
    _field(entry, "padding", lambda v: v in ("valid", "same") or pair(v), "'valid', 'same' or a pair of ints >= 0")
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
    if _SURGERY_KEY in meta and not isinstance(meta[_SURGERY_KEY], dict):
        raise _Bad(f"{_SURGERY_KEY!r} must be an object (a channel surgery record), got "
                   f"{type(meta[_SURGERY_KEY]).__name__}")
    meta["layers"] = [_check_entry(e) for e in layers]
    names = [e["name"] for e in meta["layers"]]
    if len(set(names)) != len(names):
        raise _Bad("a layer is listed twice")
    meta[_FORWARD_KEY] = _check_forward_fusions(meta.get(_FORWARD_KEY, {}))
    if _ATTENTION_KEY in meta and meta[_ATTENTION_KEY] != ATTENTION_NAME:
        raise _Bad(f"{_ATTENTION_KEY!r} must be {ATTENTION_NAME!r} when present, got {meta[_ATTENTION_KEY]!r}")
    return meta


def _check_forward_fusions(record) -> dict[str, list[ForwardFusion]]:
    """{block name: [ForwardFusion]} from the metadata's record, its schema checked."""
    if not isinstance(record, dict):
        raise _Bad(f"{_FORWARD_KEY!r} must be an object, got {type(record).__name__}")
    out = {}
    for block, fusions in record.items():
        ok = (isinstance(block, str) and block != "" and isinstance(fusions, list) and fusions
              and all(isinstance(f, dict) and set(f) == {"layer", "activation", "residual"}
                      and isinstance(f["layer"], str) and f["layer"] != ""
                      and (f["activation"] is None or f["activation"] in ACTIVATIONS)
                      and isinstance(f["residual"], bool) for f in fusions))
        if not ok:
            raise _Bad(f"{_FORWARD_KEY!r}: block {block!r} must list its fusions as objects with 'layer' (a name), "
                       f"'activation' (null or one of {sorted(ACTIVATIONS)}) and 'residual' (a bool)")
        out[block] = [ForwardFusion(**f) for f in fusions]
    return out


def _plan_forward(model: nn.Module, block_name: str, expected: list[ForwardFusion],
                  new_layers: dict[str, nn.Module]):
    """The rewrite of ``block_name``'s forward with the layers the checkpoint swaps in, checked to fuse exactly
    ``expected`` (the model is not changed here)."""
    try:
        block = model.get_submodule(block_name)
    except AttributeError:
        raise _Bad(f"{_FORWARD_KEY!r}: block {block_name!r} is not in the model") from None
    plan = plan_forward_fusions(block, lambda name, _: new_layers.get(_join(block_name, name)))
    found = plan[1] if plan is not None else []
    _expect(found == expected, f"{_FORWARD_KEY!r}: rewriting {block_name!r}'s forward fuses "
                               f"{[asdict(f) for f in found]} in this model, the file recorded "
                               f"{[asdict(f) for f in expected]}")
    return block, plan


# ---- load: building the layers --------------------------------------------------------------------------------
def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise _Bad(msg)


def _target(model: nn.Module, entry: dict) -> nn.Module:
    """The module the entry replaces, checked to have the entry's geometry."""
    name, kind = entry["name"], entry["kind"]
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise _Bad(f"layer {name!r} is not in the model") from None
    dense, packed = _KINDS[kind]
    _expect(isinstance(target, (dense, packed)),
            f"layer {name!r} is a {type(target).__name__} in the model, the checkpoint has a {packed.__name__} "
            f"(in place of a {dense.__name__})")
    if kind in ("linear", "channel_linear"):
        got = (target.in_features, target.out_features, target.bias is not None)
        want = (entry["in_features"], entry["out_features"], entry["bias"])
        _expect(got == want, f"layer {name!r}: (in_features, out_features, bias) is {got} in the model, "
                             f"{want} in the checkpoint")
        return target
    if isinstance(target, nn.Conv2d):
        _expect(target.groups == 1, f"layer {name!r} has groups={target.groups}")
        # the channel-sparse conv pads with zeros only, by explicit sizes
        _expect(kind == "conv2d" or (target.padding_mode == "zeros" and target.padding != "same"),
                f"layer {name!r} has padding={target.padding!r}, padding_mode={target.padding_mode!r}: a "
                f"ChannelSparseConv2d needs zero padding of explicit sizes")
    padding = _padding_spec(target.padding)
    if kind == "channel_conv2d" and padding == "valid":
        padding = (0, 0)
    got = (target.in_channels, target.out_channels, tuple(target.kernel_size), tuple(target.stride), padding,
           tuple(target.dilation), target.bias is not None)
    pad = entry["padding"]
    want = (entry["in_channels"], entry["out_channels"], tuple(entry["kernel_size"]), tuple(entry["stride"]),
            pad if isinstance(pad, str) else tuple(pad), tuple(entry["dilation"]), entry["bias"])
    fields = "(in, out, kernel, stride, padding, dilation, bias)"
    if kind == "conv2d":
        got, want = got + (target.padding_mode,), want + (entry["padding_mode"],)
        fields = "(in, out, kernel, stride, padding, dilation, bias, padding_mode)"
    _expect(got == want, f"layer {name!r}: {fields} is {got} in the model, {want} in the checkpoint")
    return target


def _build(entry: dict, target: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    name, kind = entry["name"], entry["kind"]
    prefix = f"{name}.linear." if kind == "conv2d" else f"{name}."
    unstructured = entry.get("format") == "unstructured"
    if kind.startswith("channel"):
        index_names = ChannelSparseWeight._index_names
    else:
        index_names = (UnstructuredSparseWeight if unstructured else BlockSparseWeight)._index_names
    parts = {}
    for key in ("values", *index_names) + (("bias",) if entry["bias"] else ()):
        _expect(prefix + key in tensors, f"layer {name!r}: tensor {prefix + key!r} is missing")
        parts[key] = tensors[prefix + key]
    values, bias = parts["values"], parts.get("bias")
    if "block_size" in entry and not unstructured:
        _expect(values.dim() == 3 and list(values.shape[1:]) == entry["block_size"],
                f"layer {name!r}: values must be [nnz, {entry['block_size'][0]}, {entry['block_size'][1]}], "
                f"got {tuple(values.shape)}")
    try:  # the weight formats validate every index array and shape
        if kind == "channel_linear":
            weight = ChannelSparseWeight(values, parts["out_index"], parts["in_index"],
                                         (entry["out_features"], entry["in_features"]))
            new = ChannelSparseLinear(weight, bias)
        elif kind == "channel_conv2d":
            weight = ChannelSparseWeight(values, parts["out_index"], parts["in_index"],
                                         (entry["out_channels"], entry["in_channels"], *entry["kernel_size"]))
            new = ChannelSparseConv2d(weight, bias, entry["stride"], entry["padding"], entry["dilation"])
        elif unstructured:
            weight = UnstructuredSparseWeight(values, parts["columns"], parts["segment_ptr"],
                                              (entry["out_features"], entry["in_features"]))
            new = UnstructuredSparseLinear(weight, bias, trainable=entry["trainable"],
                                           activation=entry.get("activation"))
        elif kind == "linear":
            weight = BlockSparseWeight(values, parts["crow_indices"], parts["col_indices"],
                                       (entry["out_features"], entry["in_features"]))
            new = SparseLinear(weight, bias, trainable=entry["trainable"], activation=entry.get("activation"))
        else:
            kh, kw = entry["kernel_size"]
            weight = BlockSparseWeight(values, parts["crow_indices"], parts["col_indices"],
                                       (entry["out_channels"], entry["in_channels"] * kh * kw))
            new = SparseConv2d(weight, bias, in_channels=entry["in_channels"], kernel_size=entry["kernel_size"],
                               stride=entry["stride"], padding=entry["padding"], dilation=entry["dilation"],
                               padding_mode=entry["padding_mode"], trainable=entry["trainable"],
                               activation=entry.get("activation"))
        if kind in ("linear", "conv2d"):
            new.activation_source = entry.get("activation_source")
    except (TypeError, ValueError) as exc:
        raise _Bad(f"layer {name!r}: {exc}") from None
    ref = next(iter(target.parameters()), None)
    if ref is None:
        ref = next(iter(target.buffers()))
    dtype = ref.dtype if ref.is_floating_point() else values.dtype
    return new.to(device=ref.device, dtype=dtype).train(target.training)


def _fused_activation_slot(model: nn.Module, entry: dict) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of the activation module a saved layer had absorbed (sparsify(fuse_activations=True)),
    checked to be that activation (or already an nn.Identity) in ``model``; None when there is none."""
    source = entry.get("activation_source")
    if source is None:
        return None
    parent_name = entry["name"].rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    act = parent._modules.get(source)
    _expect(act is not None and (isinstance(act, nn.Identity) or activation_name(act) == entry["activation"]),
            f"layer {entry['name']!r} fused the {entry['activation']} of {parent_name + '.' if parent_name else ''}"
            f"{source}, which is a {type(act).__name__} in the model")
    return parent, source


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


def _replay_surgery(model: nn.Module, record: dict):
    """Apply the checkpoint's channel surgery to ``model``; returns the function that undoes it (None when the model
    already carries exactly this surgery, e.g. when a checkpoint is loaded twice into one model)."""
    try:
        present = _surgery_record(model)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    if present is not None:
        _expect(present == record, "the model already carries a channel surgery other than the checkpoint's: load "
                                   "into a freshly built model")
        return None
    try:
        return apply_channel_surgery(model, record, return_undo=True)[1]
    except ValueError as exc:  # the model is unchanged
        raise _Bad(f"{_SURGERY_KEY}: {exc}") from None


def load(model: nn.Module, path) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (a freshly built dense model), in place.

    The channel surgery recorded in the file (what ``prune_channels`` removed) is applied first; then the layers
    that were sparse when saved are replaced by SparseLinear / SparseConv2d / ChannelSparseLinear /
    ChannelSparseConv2d (on the device and dtype of the layer they replace), and every tensor is loaded. Returns
    ``model``. Raises ValueError, leaving the model unchanged, if the file is truncated, tampered with, or does
    not fit the model.
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
    undo = None
    try:
        # Surgery first: the sparse layers' geometry and the tensors' shapes are those of the pruned model.
        if _SURGERY_KEY in meta:
            undo = _replay_surgery(model, meta[_SURGERY_KEY])
        for key, source in meta["aliases"].items():
            _expect(key not in tensors, f"alias {key!r} is also stored as a tensor")
            _expect(source in tensors, f"alias {key!r} points to {source!r}, which is not in the file")
            tensors[key] = tensors[source]
        new_layers = {e["name"]: _build(e, _target(model, e), tensors) for e in meta["layers"]}
        fused = [slot for e in meta["layers"] if (slot := _fused_activation_slot(model, e)) is not None]
        forward = {name: _plan_forward(model, name, fusions, new_layers)
                   for name, fusions in meta[_FORWARD_KEY].items()}
        _expect(not any(a != b and b.startswith(f"{a}.") for a in new_layers for b in new_layers),
                "sparse layers are nested in one another")
        _check_dense_part(model, new_layers, tensors)
    except _Bad as exc:
        if undo is not None:
            undo()
        raise ValueError(f"{path}: invalid pysparse checkpoint: {exc}") from None
    for name, layer in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    for parent, slot in fused:
        setattr(parent, slot, nn.Identity())
    model.load_state_dict(tensors, strict=True)
    for name, (block, plan) in forward.items():  # after the swap: the rewritten forward calls the new layers
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, apply_forward_fusions(block, *plan))
    if _ATTENTION_KEY in meta:   # saved from a model running pysparse's attention (a no-op unless it runs "sdpa")
        use_pysparse_attention(model)
    return model
