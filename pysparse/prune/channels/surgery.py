"""Channel surgery: remove chosen channel classes from a model's tensors and fix its modules' size attributes,
undoably; record what was done as plain data, and re-apply such a record to a freshly built dense model.

The record (:func:`channel_surgery_record`) is what a checkpoint stores: kept indices per parameter dim and the
new module attributes, one step per ``prune_channels`` call. :func:`apply_channel_surgery` validates a record
against the model before touching it, so a record that does not fit raises instead of leaving a broken model.
"""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import torch
from torch import nn

from .graph import ChannelGraph

__all__ = ["ChannelSurgery", "apply_channel_surgery", "channel_surgery_record"]

_RECORD_ATTR = "_pysparse_channel_surgery"
_RECORD_VERSION = 1
# module attributes the surgery may set (a record naming others is refused on load)
_ALLOWED_ATTRS = {"in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                  "normalized_shape", "num_channels", "embed_dim", "kdim", "vdim", "head_dim", "num_parameters"}


def _holders(model: nn.Module, t: torch.Tensor):
    out = []
    for qual, mod in model.named_modules(remove_duplicate=False):
        for name, v in list(mod._parameters.items()) + list(mod._buffers.items()):
            if v is t:
                out.append((mod, name, name in mod._parameters))
    return out


def _replace(model, old: torch.Tensor, new: torch.Tensor, holders=None):
    for mod, name, is_param in holders if holders is not None else _holders(model, old):
        if is_param:
            mod._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            mod._buffers[name] = new


def _module_attrs(mod: nn.Module, conv_mode: str | None, old: dict) -> dict:
    """The attributes a module needs after its tensors shrank (old holds the values before)."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        if conv_mode == "depthwise":
            per_group = old["out_channels"] // old["groups"]
            groups = w.shape[0] // per_group
            return {"out_channels": w.shape[0], "groups": groups, "in_channels": groups * w.shape[1]}
        return {"out_channels": w.shape[0], "in_channels": mod.groups * w.shape[1]}
    if isinstance(mod, nn.Linear):
        return {"out_features": mod.weight.shape[0], "in_features": mod.weight.shape[1]}
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        t = mod.weight if mod.weight is not None else mod.running_mean
        return {"num_features": t.shape[0]}
    if isinstance(mod, nn.GroupNorm) and mod.weight is not None:
        return {"num_channels": mod.weight.shape[0]}
    if hasattr(mod, "normalized_shape") and getattr(mod, "weight", None) is not None:
        return {"normalized_shape": list(mod.weight.shape)}
    if isinstance(mod, nn.MultiheadAttention):
        e = mod.in_proj_weight.shape[1]
        return {"embed_dim": e, "kdim": e, "vdim": e, "head_dim": e // mod.num_heads}
    if isinstance(mod, nn.PReLU):
        return {"num_parameters": mod.weight.numel()}
    return {}


def _keep_attention_temperature(mha: nn.MultiheadAttention, old_head_dim: int) -> None:
    """Scores are divided by sqrt(head_dim): scale the query projection by sqrt(new / old) so the kept dims give
    the scores the dense model gives with the removed dims zeroed, instead of sharper ones. (The tensors are the
    surgery's fresh copies: the originals, kept for undo, are untouched.)"""
    e = mha.embed_dim
    scale = math.sqrt(mha.head_dim / old_head_dim)
    with torch.no_grad():
        mha.in_proj_weight[:e].mul_(scale)
        if mha.in_proj_bias is not None:
            mha.in_proj_bias[:e].mul_(scale)


def _set_attrs(mod, attrs):
    for k, v in attrs.items():
        setattr(mod, k, tuple(v) if k == "normalized_shape" else v)


class ChannelSurgery:
    """Applies a set of removed classes to the model; remembers how to undo it and what to record."""

    def __init__(self, model: nn.Module, g: ChannelGraph):
        self.model, self.g = model, g
        self.roots = g.roots(np.arange(g.num_classes))
        self.undo: list = []
        self.record: dict = {}

    def apply(self, removed: set[int]) -> None:
        model, g = self.model, self.g
        dropped = np.zeros(g.num_classes, dtype=bool)
        dropped[list(removed)] = True
        touched: dict[str, nn.Module] = {}
        params_rec = {}
        for info in g.params.values():
            keep = {}
            for d, lab in enumerate(info.labels):
                drop = (lab >= 0) & dropped[self.roots[np.maximum(lab, 0)]]
                if drop.any():
                    keep[d] = np.nonzero(~drop)[0]
            if not keep:
                continue
            old = info.tensor
            new = old.detach()
            for d, idx in keep.items():
                new = new.index_select(d, torch.as_tensor(idx, device=old.device))
            holders = [(model.get_submodule(q), nm, nm in model.get_submodule(q)._parameters)
                       for q, nm in info.holders]
            _replace(model, old, new.contiguous(), holders)
            self.undo.append(("tensor", holders, old))
            params_rec[info.name] = {"shape": list(old.shape),
                                     "keep": {str(d): idx.tolist() for d, idx in keep.items()}}
            for q, _ in info.holders:
                touched[q] = model.get_submodule(q)
        modules_rec = {}
        for q, mod in touched.items():
            old_attrs = {k: getattr(mod, k) for k in _ALLOWED_ATTRS if hasattr(mod, k)}
            mode = g.conv_modes.get(id(_orig_weight(self.undo, mod))) if hasattr(mod, "weight") else None
            attrs = _module_attrs(mod, mode, old_attrs)
            if attrs:
                self.undo.append(("attrs", mod, {k: old_attrs[k] for k in attrs if k in old_attrs}))
                _set_attrs(mod, attrs)
                modules_rec[q] = attrs
            if isinstance(mod, nn.MultiheadAttention) and attrs.get("head_dim", mod.head_dim) != old_attrs["head_dim"]:
                _keep_attention_temperature(mod, old_attrs["head_dim"])
        self.record = {"params": params_rec, "modules": modules_rec}

    def revert(self) -> None:
        _undo(self.undo)
        self.undo = []
        self.record = {}

    def append_to_record(self) -> None:
        """Add this surgery as a step of the model's record (what a checkpoint replays), if it removed anything."""
        if self.record.get("params"):
            steps = copy.deepcopy(getattr(self.model, _RECORD_ATTR, {"version": _RECORD_VERSION, "steps": []}))
            steps["steps"].append(self.record)
            setattr(self.model, _RECORD_ATTR, steps)


def _orig_weight(undo, mod):
    for kind, holders, old in undo:
        if kind == "tensor" and any(m is mod and nm == "weight" for m, nm, _ in holders):
            return old
    return getattr(mod, "weight", None)



# ---- the record ----------------------------------------------------------------------------------------------
def channel_surgery_record(model: nn.Module) -> dict | None:
    """The channel surgery applied to ``model`` by :func:`prune_channels`, as JSON-able data (None if none).

    ``{"version": 1, "steps": [{"params": {name: {"shape": [...], "keep": {dim: [indices]}}},
    "modules": {module_name: {attr: value}}}, ...]}``: one step per ``prune_channels`` call, in order.
    """
    rec = getattr(model, _RECORD_ATTR, None)
    return copy.deepcopy(rec) if rec is not None else None


def apply_channel_surgery(model: nn.Module, record: dict, *, return_undo: bool = False):
    """Re-apply a :func:`channel_surgery_record` to a freshly built dense ``model`` (in place; returned).

    The record is validated against the model first (names, shapes, index ranges, attribute names); a record
    that does not fit raises ValueError naming what did not match, and leaves the model unchanged. With
    ``return_undo=True`` returns ``(model, undo)``: calling ``undo()`` restores the model as it was (for a loader
    that must leave the model unchanged when a later step of loading fails).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(record, dict) or record.get("version") != _RECORD_VERSION or \
            not isinstance(record.get("steps"), list):
        raise ValueError(f"record must be a channel surgery record of version {_RECORD_VERSION} with a 'steps' "
                         f"list, got {type(record).__name__} "
                         f"{record.get('version') if isinstance(record, dict) else ''}")
    undo_list = []
    try:
        for i, step in enumerate(record["steps"]):
            undo_list.extend(_apply_step(model, step, i))
    except Exception:
        _undo(undo_list)
        raise
    previous = getattr(model, _RECORD_ATTR, None)
    steps = copy.deepcopy(previous) if previous is not None else {"version": _RECORD_VERSION, "steps": []}
    steps["steps"].extend(copy.deepcopy(record["steps"]))
    setattr(model, _RECORD_ATTR, steps)
    if not return_undo:
        return model

    def undo():
        _undo(undo_list)
        if previous is None:
            delattr(model, _RECORD_ATTR)
        else:
            setattr(model, _RECORD_ATTR, previous)

    return model, undo


def _undo(undo_list):
    for kind, a, b in reversed(undo_list):
        if kind == "tensor":
            for mod, name, is_param in a:
                (mod._parameters if is_param else mod._buffers)[name] = b
        else:
            _set_attrs(a, b)


def _apply_step(model, step, i):
    if not isinstance(step, dict) or not isinstance(step.get("params"), dict) or \
            not isinstance(step.get("modules"), dict):
        # a malformed record is bad data read from a checkpoint: ValueError, as for every other record error
        raise ValueError(f"record step {i} must be a dict with 'params' and 'modules' dicts")  # noqa: TRY004
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    plans = []
    for name, spec in step["params"].items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"record step {i}: the model has no parameter or buffer {name!r}")
        if not isinstance(spec, dict) or spec.get("shape") != list(t.shape):
            got = spec.get("shape") if isinstance(spec, dict) else spec
            raise ValueError(f"record step {i}: {name} must have shape {list(t.shape)} before the surgery, "
                             f"the record says {got}")
        if not isinstance(spec.get("keep", {}), dict):
            raise ValueError(f"record step {i}: {name}: 'keep' must map dims to kept indices, got "  # noqa: TRY004
                             f"{type(spec['keep']).__name__}")  # (bad data in a checkpoint, as above)
        keep = {}
        for d, idx in spec.get("keep", {}).items():
            try:
                d = int(d)
            except (TypeError, ValueError):
                raise ValueError(f"record step {i}: {name}: dim {d!r} is not an int") from None
            if not 0 <= d < t.dim():
                raise ValueError(f"record step {i}: {name}: dim {d} out of range for {t.dim()}-D")
            if not isinstance(idx, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in idx):
                raise ValueError(f"record step {i}: {name}: kept indices of dim {d} must be a list of ints")
            if not idx or any(b <= a for a, b in itertools.pairwise(idx)) or idx[0] < 0 or idx[-1] >= t.shape[d]:
                raise ValueError(f"record step {i}: {name}: kept indices of dim {d} must be strictly increasing "
                                 f"in [0, {t.shape[d]}), non-empty")
            keep[d] = idx
        plans.append((t, keep))
    mods = []
    for q, attrs in step["modules"].items():
        try:
            mod = model.get_submodule(q)
        except AttributeError:
            raise ValueError(f"record step {i}: the model has no submodule {q!r}") from None
        if not isinstance(attrs, dict) or not set(attrs) <= _ALLOWED_ATTRS:
            raise ValueError(f"record step {i}: {q}: attributes must be among {sorted(_ALLOWED_ATTRS)}, got "
                             f"{sorted(attrs) if isinstance(attrs, dict) else attrs}")
        for k, v in attrs.items():
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0 if k != "normalized_shape" else \
                isinstance(v, list) and all(isinstance(x, int) and x > 0 for x in v)
            if not ok:
                raise ValueError(f"record step {i}: {q}.{k} has an invalid value {v!r}")
        mods.append((q, mod, attrs))
    undo = []
    resized = {}
    for t, keep in plans:
        new = t.detach()
        for d, idx in keep.items():
            new = new.index_select(d, torch.as_tensor(idx, device=t.device))
        holders = _holders(model, t)
        _replace(model, t, new.contiguous(), holders)
        undo.append(("tensor", holders, t))
        resized.update({id(m): m for m, _, _ in holders})
    for _, mod, attrs in mods:
        undo.append(("attrs", mod, {k: getattr(mod, k) for k in attrs if hasattr(mod, k)}))
        _set_attrs(mod, attrs)
    # A tampered record could give a module sizes its tensors do not have: the model would fail only when run.
    why = next((f"module {q!r} gets new sizes but none of its tensors shrinks" for q, mod, _ in mods
                if id(mod) not in resized), None)
    for q, mod in model.named_modules():
        if why is None and id(mod) in resized:
            mismatch = _size_mismatch(mod)
            why = mismatch and f"after the surgery {q or 'the model'} does not fit its tensors: {mismatch}"
    if why:
        _undo(undo)
        raise ValueError(f"record step {i}: {why}")
    return undo


def _size_mismatch(mod: nn.Module) -> str | None:
    """Why ``mod``'s size attributes disagree with its (resized) tensors, or None when they agree."""
    if isinstance(mod, nn.MultiheadAttention):
        if mod.in_proj_weight is None:
            return "a MultiheadAttention with separate q/k/v projections is never resized"
        if mod.in_proj_weight.shape[1] % mod.num_heads:
            return f"embed_dim {mod.in_proj_weight.shape[1]} is not a multiple of num_heads {mod.num_heads}"
    if isinstance(mod, nn.modules.conv._ConvNd) and (mod.groups < 1 or mod.weight.shape[0] % mod.groups):
        return f"{mod.weight.shape[0]} output channels do not split into groups={mod.groups}"
    if isinstance(mod, nn.GroupNorm) and mod.weight is not None and mod.weight.shape[0] % mod.num_groups:
        return f"{mod.weight.shape[0]} channels do not split into num_groups={mod.num_groups}"
    want = _module_attrs(mod, None, {})
    got = {k: list(getattr(mod, k)) if k == "normalized_shape" else getattr(mod, k, None) for k in want}
    return None if got == want else f"attributes {got}, tensors give {want}"
