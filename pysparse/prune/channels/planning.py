"""Which channels to remove: importance per channel class, then per segment the lowest ``ratio`` or every
class below ``threshold``, rounded so the producing layers keep a multiple of ``round_to`` channels.

Importance:

- ``"magnitude"``: the L1 or L2 norm of every weight slice a class owns, summed over all the layers sharing it
  (a residual stream's channel counts every block's slice).
- ``"bn"`` (network slimming, Liu et al. 2017): ``|gamma|`` of the BatchNorm that normalises the channel, the
  largest one where several do (a residual stream crosses one per block: the channel is removable only when it
  is negligible in every one of them). A channel that no BatchNorm scales has no such score, and a weight norm
  is not on the same scale as gamma, so it is kept (pinned, with the reason in the report) rather than ranked by
  a number that does not mean the same thing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .graph import ChannelGraph

IMPORTANCES = ("magnitude", "bn")
NO_BATCHNORM = "no BatchNorm scales these channels (importance='bn' ranks channels by BatchNorm gamma)"


@dataclass
class Family:
    """Coupled channel classes: ranked per segment, removed together, rolled back together."""

    root: int
    classes: int                # classes in the family (its width in removal units)
    removed: list[int]
    slices: list[str]           # "param[dim]" that shrink with it


def magnitude_importance(g: ChannelGraph, roots: np.ndarray, norm: str) -> np.ndarray:
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


def batchnorm_importance(g: ChannelGraph, roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the largest |gamma| of the BatchNorms it passes through, and whether any does."""
    imp = np.zeros(len(roots), dtype=np.float64)
    scaled = np.zeros(len(roots), dtype=bool)
    for key, gamma in g.bn_scales.items():
        info = g.params.get(key)
        if info is None:
            continue
        lab = info.labels[0]
        ok = lab >= 0
        v = gamma.detach().abs().double().cpu().numpy()
        np.maximum.at(imp, roots[lab[ok]], v[ok])
        scaled[roots[lab[ok]]] = True
    return imp, scaled


def _removal_count(free: int, total: int, step: int, ratio: float | None, below: int | None) -> int:
    """How many classes of a segment to remove so that the kept count is a positive multiple of ``step``.
    By ratio: the count closest to ``ratio * total``. By threshold: the most, up to the ``below`` classes under
    it (rounding only ever keeps a class above the threshold, never removes one)."""
    limit = min(free, total - 1)
    if below is not None:
        return next((r for r in range(min(limit, below), 0, -1) if (total - r) % step == 0), 0)
    want = round(ratio * total)
    if want == 0:
        return 0
    best = 0
    for r in range(limit, 0, -1):
        if (total - r) % step == 0 and abs(r - want) <= abs(best - want):
            best = r
    return best


def plan_removal(g: ChannelGraph, *, ratio: float | None, threshold: float | None, norm: str, importance: str,
                 round_to: int) -> list[Family]:
    """Choose the classes to remove: per *segment* (classes made by the same set of producing layers, e.g. one
    conv's outputs, or a residual stream made by several), the lowest-ranked ``ratio`` of it or those whose
    importance is below ``threshold``, rounded so the producing layers keep a multiple of ``round_to``
    channels. Segments are grouped into families for rollback."""
    roots = g.roots(np.arange(g.num_classes))
    producers = list(g.producer_dims.values())
    made_by: dict[int, set] = {}
    for k, lab in enumerate(producers):
        for r in np.unique(roots[lab[lab >= 0]]).tolist():
            made_by.setdefault(r, set()).add(k)
    if importance == "bn":
        imp, scaled = batchnorm_importance(g, roots)
        unscaled = [r for r in made_by if not scaled[r]]
        if unscaled:
            g.pin(np.array(unscaled, dtype=np.int64), NO_BATCHNORM)
    else:
        imp = magnitude_importance(g, roots, norm)
    segments: dict[frozenset, list[int]] = {}
    for r, ks in made_by.items():
        segments.setdefault(frozenset(ks), []).append(r)
    families: dict[int, Family] = {}
    for key, members in segments.items():
        fam = g.family(members[0])
        if fam not in families:
            families[fam] = Family(fam, 0, [], [])
        families[fam].classes += len(members)
        free = [r for r in members if g.is_free(r)]
        if not free:
            continue
        lab = producers[min(key)]
        per_class = np.unique(roots[lab[lab >= 0]], return_counts=True)[1]
        unit = math.gcd(*per_class.tolist()) or 1
        step = round_to // math.gcd(round_to, unit)   # kept classes must be a multiple of this
        below = None if threshold is None else sum(1 for r in free if imp[r] < threshold)
        count = _removal_count(len(free), len(members), step, ratio, below)
        order = sorted(free, key=lambda r: (imp[r], r))
        families[fam].removed.extend(order[:count])
    for info in g.params.values():
        for d, lab in enumerate(info.labels):
            ok = lab >= 0
            if ok.any():
                fam = g.family(int(roots[lab[ok][0]]))
                if fam in families and len(families[fam].slices) < 12:
                    families[fam].slices.append(f"{info.name}[{d}]")
    return list(families.values())
