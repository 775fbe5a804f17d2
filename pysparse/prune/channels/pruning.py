"""Structural channel pruning: rank coupled channel families, remove channels physically, never break the model.

``prune_channels`` builds the channel dependency graph (:mod:`.propagation`), chooses per segment the channels
to remove (:mod:`.planning`: the lowest ``ratio``, or those whose importance is below ``threshold``), removes
them (:mod:`.surgery`), then runs the pruned model: any family whose removal makes the model fail or change its
output shape is rolled back (found by bisection) and reported with the error (:mod:`.report`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .planning import IMPORTANCES, NO_BATCHNORM, plan_removal
from .propagation import build_channel_graph
from .report import ChannelPruningReport, FamilyResult, layer_changes, layer_shapes
from .surgery import ChannelSurgery
from .tracing import TraceFailure

__all__ = ["prune_channels"]

DEFAULT_RATIO = 0.5


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
def prune_channels(model: nn.Module, example_inputs, *, ratio: float | None = None, norm: str = "l2",
                   filter_fn=None, threshold: float | None = None, importance: str = "magnitude",
                   round_to: int = 8, return_report: bool = False):
    """Remove the least important channels of ``model`` physically, consistently across dependent layers.

    Args:
        model: any ``nn.Module`` that torch.fx can trace (submodules it cannot trace are kept whole). Pruned in
            place and returned.
        example_inputs: a tensor or a tuple of positional inputs the model runs on (small is fine: 1x3x64x64).
        ratio: fraction of each coupled channel family to remove, in [0, 1); 0.5 when neither ``ratio`` nor
            ``threshold`` is given. Give one of the two, not both.
        norm: ``"l1"`` or ``"l2"``: with ``importance="magnitude"``, a channel's importance is this norm of every
            weight slice the channel owns, summed over all the layers that share it (a residual stream's
            channel counts every block's slice). Not used by ``importance="bn"``.
        filter_fn: ``filter_fn(name, module) -> bool``; modules it rejects keep all their channels (and so does
            every layer coupled to them).
        threshold: remove every channel whose importance is below this (>= 0) instead of a fixed fraction;
            rounding to ``round_to`` only ever keeps a channel below it, never removes one above it.
        importance: ``"magnitude"`` (weight norms, above) or ``"bn"`` (network slimming, Liu et al. 2017: the
            |gamma| of the BatchNorm that normalises the channel, the largest where several do; train with an
            L1 penalty on gamma first). With ``"bn"``, channels no BatchNorm scales are kept, and the report
            says so for their layers.
        round_to: kept channel counts are multiples of this (8 keeps vector kernels efficient; 1 disables).
        return_report: also return a :class:`ChannelPruningReport` (per layer: channels before/after and lost,
            and why a layer was left unpruned; ops whose channel rule failed).

    The output shapes never change, and the model is run before returning: a family whose removal breaks it is
    rolled back and reported. A model that cannot be traced at all is returned unchanged (see the report).
    """
    example_inputs = _check_arguments(model, example_inputs, ratio, norm, filter_fn, threshold, importance,
                                      round_to)
    if threshold is None and ratio is None:
        ratio = DEFAULT_RATIO
    report = ChannelPruningReport()
    report.criterion = (f"importance below {threshold}" if threshold is not None else f"lowest {ratio:.0%}") + \
        (" by BatchNorm |gamma|" if importance == "bn" else f" by magnitude ({norm})")
    report.params_before = report.params_after = _count_params(model)
    report.flops_before = report.flops_after = _flops(model, example_inputs)
    reference = {}
    for train in (False, True):
        try:
            reference[train] = _run(model, example_inputs, train)
        except Exception as exc:
            if not train:
                raise ValueError(f"the model does not run on example_inputs: {type(exc).__name__}: {exc}") from exc
            report.notes.append(f"the dense model does not run in train mode on example_inputs ({exc}); "
                                "the pruned model is checked in eval mode only")
    before = layer_shapes(model)
    try:
        g = build_channel_graph(model, example_inputs)
    except TraceFailure as exc:
        report.notes.append(f"model left unpruned: {exc}")
        report.ran = True
        report.layers = layer_changes(model, before, None, {})
        return (model, report) if return_report else model
    report.traced = True
    report.notes.extend(g.notes)
    report.rule_failures = list(g.rule_failures)
    if filter_fn is not None:
        for info in g.params.values():
            for q, _ in info.holders:
                if not filter_fn(q, model.get_submodule(q)):
                    for lab in info.labels:
                        g.pin(lab, f"excluded by filter_fn ({q})")
    families = [f for f in plan_removal(g, ratio=None if threshold is not None else float(ratio),
                                        threshold=threshold, norm=norm, importance=importance, round_to=round_to)
                if f.removed]
    unscaled = [lc for lc in layer_changes(model, before, g, {}) if NO_BATCHNORM in lc.note]
    if unscaled:
        names = ", ".join(lc.name for lc in unscaled[:4]) + (", ..." if len(unscaled) > 4 else "")
        report.notes.append(f"importance='bn': no BatchNorm scales the output channels of {len(unscaled)} "
                            f"layer(s) ({names}); they are kept")

    surgery = ChannelSurgery(model, g)
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
    surgery.append_to_record()
    report.params_after = _count_params(model)
    report.flops_after = _flops(model, example_inputs)
    active_roots = {f.root for f in active}
    report.families = [FamilyResult(f.slices[:8], f.classes, len(f.removed) if f.root in active_roots else 0,
                                    "pruned" if f.root in active_roots else "rolled back", rolled.get(f.root, ""))
                       for f in families]
    report.layers = layer_changes(model, before, g, rolled)
    return (model, report) if return_report else model


def _check_arguments(model, example_inputs, ratio, norm, filter_fn, threshold, importance, round_to) -> tuple:
    """Validate ``prune_channels``' arguments; the example inputs as a tuple."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError(f"example_inputs must be a tensor or a non-empty tuple of inputs, got "
                        f"{type(example_inputs).__name__}")
    if ratio is not None and threshold is not None:
        raise ValueError(f"give either ratio or threshold, not both (got ratio={ratio!r}, threshold={threshold!r})")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or
                              not 0.0 <= ratio < 1.0):
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or
                                  not math.isfinite(threshold) or threshold < 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (name, module) -> bool, got {type(filter_fn).__name__}")
    return tuple(example_inputs)


def _find_bad(model, g, fams, inputs, reference) -> dict[int, str]:
    """Families that break the model on their own (bisection: O(k log n) forward passes for k bad families)."""
    bad: dict[int, str] = {}

    def test(group) -> str | None:
        s = ChannelSurgery(model, g)
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

