"""Structural channel pruning: rank coupled channel families, remove channels physically, never break the model.

``prune_channels`` builds the channel dependency graph (``channel_graph``), ranks every free channel class by the
L1/L2 norm of all the weight slices it owns (summed over the family's layers), removes the lowest ``ratio`` of
each family (kept counts rounded to ``round_to``), then runs the pruned model: any family whose removal makes the
model fail or change its output shape is rolled back (found by bisection) and reported with the error.

The surgery is recorded as plain data (kept indices per parameter dim, new module attributes) so a checkpoint can
re-apply it to a freshly built dense model: :func:`channel_surgery_record` / :func:`apply_channel_surgery`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .channel_graph import ChannelGraph, TraceFailure, build_channel_graph

__all__ = ["prune_channels", "ChannelPruningReport", "channel_surgery_record", "apply_channel_surgery"]

_RECORD_ATTR = "_pysparse_channel_surgery"
_RECORD_VERSION = 1
# module attributes the surgery may set (a record naming others is refused on load)
_ALLOWED_ATTRS = {"in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                  "normalized_shape", "num_channels", "embed_dim", "kdim", "vdim", "head_dim", "num_parameters"}


# ---- report ---------------------------------------------------------------------------------------------------
@dataclass
class LayerChange:
    name: str
    kind: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    note: str = ""  # why the output channels were kept, when they were


@dataclass
class FamilyResult:
    layers: list[str]           # "module.param[dim]" slices that shrink together (abridged)
    channels: int               # classes in the family (its width in removal units)
    removed: int
    status: str                 # "pruned" | "rolled back"
    reason: str = ""


@dataclass
class ChannelPruningReport:
    """What ``prune_channels`` did: per layer, per coupled family, totals, and what it left alone and why."""

    ran: bool = False                 # the pruned model ran on the example inputs with its output shapes kept
    traced: bool = False
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    layers: list[LayerChange] = field(default_factory=list)
    families: list[FamilyResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def pruned_layers(self) -> list[LayerChange]:
        return [lc for lc in self.layers if (lc.in_after, lc.out_after) != (lc.in_before, lc.out_before)]

    def unpruned(self) -> dict[str, str]:
        """Layers whose output channels were all kept, with the reason."""
        return {lc.name: lc.note for lc in self.layers if lc.out_after == lc.out_before}

    def __str__(self) -> str:
        lines = [f"prune_channels: ran={self.ran} traced={self.traced} params {self.params_before:,} -> "
                 f"{self.params_after:,} ({_ratio(self.params_after, self.params_before)}), FLOPs "
                 f"{self.flops_before:,} -> {self.flops_after:,} ({_ratio(self.flops_after, self.flops_before)})"]
        width = max((len(lc.name) for lc in self.layers), default=4)
        lines.append(f"{'layer'.ljust(width)}  {'kind':<20} {'in':>11} {'out':>11}  note")
        for lc in self.layers:
            lines.append(f"{lc.name.ljust(width)}  {lc.kind:<20} {lc.in_before:>5}->{lc.in_after:<5} "
                         f"{lc.out_before:>5}->{lc.out_after:<5}  {lc.note}")
        for fam in self.families:
            if fam.status == "rolled back":
                lines.append(f"rolled back: {', '.join(fam.layers[:4])}: {fam.reason}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _ratio(a, b):
    return f"{a / b:.1%}" if b else "n/a"


# ---- planning -------------------------------------------------------------------------------------------------
@dataclass
class _Family:
    root: int
    classes: int                # classes in the family (its width in removal units)
    removed: list[int]
    slices: list[str]           # "param[dim]" that shrink with it


def _importance(g: ChannelGraph, roots: np.ndarray, norm: str) -> np.ndarray:
    """Per class: sum over every weight slice it owns of that slice's L1 or L2 norm."""
    imp = np.zeros(len(roots), dtype=np.float64)
    for info in g.params.values():
        t = info.tensor
        if not info.is_param or t.dim() < 2 or not t.is_floating_point():
            continue
        w = t.detach().float()
        for d, lab in enumerate(info.labels):
            if t.numel() // max(t.shape[d], 1) <= 1:
                continue  # a per-channel scale, not a weight slice
            other = [i for i in range(t.dim()) if i != d]
            v = (w.abs().sum(other) if norm == "l1" else w.pow(2).sum(other).sqrt()).double().cpu().numpy()
            ok = lab >= 0
            np.add.at(imp, roots[lab[ok]], v[ok])
    return imp


def _plan(g: ChannelGraph, ratio: float, norm: str, round_to: int) -> list[_Family]:
    """Choose the classes to remove: per *segment* (classes made by the same set of producing layers, e.g. one
    conv's outputs, or a residual stream made by several), the lowest-ranked ``ratio`` of it, rounded so the
    producing layers keep a multiple of ``round_to`` channels. Segments are grouped into families for rollback."""
    roots = g.roots(np.arange(g.num_classes))
    imp = _importance(g, roots, norm)
    producers = list(g.producer_dims.values())
    made_by: dict[int, set] = {}
    for k, lab in enumerate(producers):
        for r in np.unique(roots[lab[lab >= 0]]).tolist():
            made_by.setdefault(r, set()).add(k)
    segments: dict[frozenset, list[int]] = {}
    for r, ks in made_by.items():
        segments.setdefault(frozenset(ks), []).append(r)
    families: dict[int, _Family] = {}
    for key, members in segments.items():
        fam = g.ffind(members[0])
        if fam not in families:
            families[fam] = _Family(fam, 0, [], [])
        families[fam].classes += len(members)
        free = [r for r in members if g.reason[r] is None]
        if not free:
            continue
        lab = producers[min(key)]
        per_class = np.unique(roots[lab[lab >= 0]], return_counts=True)[1]
        unit = math.gcd(*per_class.tolist()) or 1
        step = round_to // math.gcd(round_to, unit)   # kept classes must be a multiple of this
        total = len(members)
        want = int(round(ratio * total))
        best = 0
        for r in range(min(len(free), total - 1), 0, -1):
            if (total - r) % step == 0 and abs(r - want) <= abs(best - want):
                best = r
        if best == 0 or want == 0:
            continue
        order = sorted(free, key=lambda r: (imp[r], r))
        families[fam].removed.extend(order[:best])
    for info in g.params.values():
        for d, lab in enumerate(info.labels):
            ok = lab >= 0
            if ok.any():
                fam = g.ffind(int(roots[lab[ok][0]]))
                if fam in families and len(families[fam].slices) < 12:
                    families[fam].slices.append(f"{info.name}[{d}]")
    return list(families.values())


# ---- surgery --------------------------------------------------------------------------------------------------
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


class _Surgery:
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


def _orig_weight(undo, mod):
    for kind, holders, old in undo:
        if kind == "tensor" and any(m is mod and nm == "weight" for m, nm, _ in holders):
            return old
    return getattr(mod, "weight", None)


# ---- running the model ----------------------------------------------------------------------------------------
def _shapes(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return tuple(_shapes(o) for o in out)
    return type(out).__name__


def _run(model: nn.Module, inputs: tuple, train: bool):
    """Output shapes of one forward pass in the given mode, leaving buffers and the RNG as they were."""
    was = model.training
    saved = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.train(train)
            return _shapes(model(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]))
    finally:
        model.train(was)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved and saved[name].shape == b.shape:
                    b.copy_(saved[name])


def _check(model, inputs, reference) -> str | None:
    """None when the model runs in every reference mode with the same output shapes, else the error."""
    for train, want in reference.items():
        try:
            got = _run(model, inputs, train)
        except Exception as exc:  # noqa: BLE001 - any failure means: roll back
            return f"{'train' if train else 'eval'} forward failed: {type(exc).__name__}: {str(exc)[:200]}"
        if got != want:
            return f"output shapes changed in {'train' if train else 'eval'} mode: {got} != {want}"
    return None


def _flops(model, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*[x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - FLOPs are informative only
        return 0
    finally:
        model.train(was)


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- entry point ----------------------------------------------------------------------------------------------
def prune_channels(model: nn.Module, example_inputs, *, ratio: float = 0.5, norm: str = "l2", filter_fn=None,
                   round_to: int = 8, return_report: bool = False):
    """Remove the least important channels of ``model`` physically, consistently across dependent layers.

    Args:
        model: any ``nn.Module`` that torch.fx can trace (submodules it cannot trace are kept whole). Pruned in
            place and returned.
        example_inputs: a tensor or a tuple of positional inputs the model runs on (small is fine: 1x3x64x64).
        ratio: fraction of each coupled channel family to remove, in [0, 1).
        norm: ``"l1"`` or ``"l2"``: channel importance is this norm of every weight slice the channel owns,
            summed over all the layers that share it (a residual stream's channel counts every block's slice).
        filter_fn: ``filter_fn(name, module) -> bool``; modules it rejects keep all their channels (and so does
            every layer coupled to them).
        round_to: kept channel counts are multiples of this (8 keeps vector kernels efficient; 1 disables).
        return_report: also return a :class:`ChannelPruningReport` (per layer: channels before/after, and why a
            layer was left unpruned).

    The output shapes never change, and the model is run before returning: a family whose removal breaks it is
    rolled back and reported. A model that cannot be traced at all is returned unchanged (see the report).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError(f"example_inputs must be a tensor or a non-empty tuple of inputs, got "
                        f"{type(example_inputs).__name__}")
    example_inputs = tuple(example_inputs)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (name, module) -> bool, got {type(filter_fn).__name__}")

    report = ChannelPruningReport()
    report.params_before = report.params_after = _count_params(model)
    report.flops_before = report.flops_after = _flops(model, example_inputs)
    reference = {}
    for train in (False, True):
        try:
            reference[train] = _run(model, example_inputs, train)
        except Exception as exc:  # noqa: BLE001
            if not train:
                raise ValueError(f"the model does not run on example_inputs: {type(exc).__name__}: {exc}") from exc
            report.notes.append(f"the dense model does not run in train mode on example_inputs ({exc}); "
                                "the pruned model is checked in eval mode only")
    before = _layer_shapes(model)
    try:
        g = build_channel_graph(model, example_inputs)
    except TraceFailure as exc:
        report.notes.append(f"model left unpruned: {exc}")
        report.ran = True
        report.layers = _layer_report(model, before, None, {})
        return (model, report) if return_report else model
    report.traced = True
    report.notes.extend(g.notes)
    if filter_fn is not None:
        for info in g.params.values():
            for q, _ in info.holders:
                if not filter_fn(q, model.get_submodule(q)):
                    for lab in info.labels:
                        g.pin(lab, f"excluded by filter_fn ({q})")
    families = [f for f in _plan(g, float(ratio), norm, round_to) if f.removed]

    surgery = _Surgery(model, g)
    rolled: dict[int, str] = {}
    active = list(families)
    while active:
        surgery.apply({r for f in active for r in f.removed})
        err = _check(model, example_inputs, reference)
        if err is None:
            break
        surgery.revert()
        bad = _find_bad(model, g, active, example_inputs, reference)
        if not bad:  # fails only in combination: drop the widest family and try again
            bad = {max(active, key=lambda f: len(f.removed)).root: err}
        rolled.update(bad)
        active = [f for f in active if f.root not in bad]
    # Either the last surgery ran, or nothing is left to prune and the model is the unpruned one, which ran.
    report.ran = True
    if surgery.record.get("params"):
        steps = copy.deepcopy(getattr(model, _RECORD_ATTR, {"version": _RECORD_VERSION, "steps": []}))
        steps["steps"].append(surgery.record)
        setattr(model, _RECORD_ATTR, steps)
    report.params_after = _count_params(model)
    report.flops_after = _flops(model, example_inputs)
    active_roots = {f.root for f in active}
    report.families = [FamilyResult(f.slices[:8], f.classes, len(f.removed) if f.root in active_roots else 0,
                                    "pruned" if f.root in active_roots else "rolled back", rolled.get(f.root, ""))
                       for f in families]
    report.layers = _layer_report(model, before, g, rolled)
    return (model, report) if return_report else model


def _find_bad(model, g, fams, inputs, reference) -> dict[int, str]:
    """Families that break the model on their own (bisection: O(k log n) forward passes for k bad families)."""
    bad: dict[int, str] = {}

    def test(group) -> str | None:
        s = _Surgery(model, g)
        s.apply({r for f in group for r in f.removed})
        try:
            return _check(model, inputs, reference)
        finally:
            s.revert()

    def search(group, err=None):
        err = err if err is not None else test(group)
        if err is None:
            return
        if len(group) == 1:
            bad[group[0].root] = err
            return
        half = len(group) // 2
        search(group[:half])
        search(group[half:])

    search(fams)
    return bad


# ---- per-layer report -----------------------------------------------------------------------------------------
def _layer_shapes(model) -> dict[str, tuple[str, int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = (type(m).__name__, m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (type(m).__name__, m.in_features, m.out_features)
        elif isinstance(m, nn.MultiheadAttention):
            out[name] = (type(m).__name__, m.embed_dim, m.embed_dim)
    return out


def _layer_report(model, before, g, rolled) -> list[LayerChange]:
    after = _layer_shapes(model)
    rows = []
    for name, (kind, cin, cout) in before.items():
        _, cin2, cout2 = after.get(name, (kind, cin, cout))
        note = ""
        if cout2 == cout:
            note = _why_kept(name, g, rolled) if g is not None else "model not traced"
        rows.append(LayerChange(name, kind, cin, cin2, cout, cout2, note))
    return rows


def _why_kept(name, g, rolled) -> str:
    info, dim = None, 0
    for i in g.params.values():
        for q, nm in i.holders:
            if q == name and nm in ("weight", "in_proj_weight"):
                info, dim = i, 1 if nm == "in_proj_weight" else 0  # attention: its outer (embed) dim
    if info is None:
        return "not reached by the trace (or inside an opaque block)"
    lab = info.labels[dim]
    reasons = []
    for c in dict.fromkeys(lab.tolist()):
        r = g.why(c)
        if r and r not in reasons:
            reasons.append(r)
    if reasons:
        return "; ".join(reasons[:2]) + (" ..." if len(reasons) > 2 else "")
    fam = g.ffind(int(lab[lab >= 0][0])) if (lab >= 0).any() else None
    if fam in rolled:
        return f"rolled back: {rolled[fam]}"
    return "nothing to remove at this ratio / round_to"


# ---- save / load support --------------------------------------------------------------------------------------
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
        raise ValueError(f"record step {i} must be a dict with 'params' and 'modules' dicts")
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
            raise ValueError(f"record step {i}: {name}: 'keep' must map dims to kept indices, got "
                             f"{type(spec['keep']).__name__}")
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
            if not idx or any(b <= a for a, b in zip(idx, idx[1:])) or idx[0] < 0 or idx[-1] >= t.shape[d]:
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
