"""What ``prune_channels`` did, for the user: per layer (channels before and after, why a layer kept all of its
output channels), per coupled family, totals, rule failures, and notes on what was left alone and why."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .graph import ChannelGraph, RuleFailure

__all__ = ["ChannelPruningReport", "FamilyResult", "LayerChange"]


@dataclass
class LayerChange:
    name: str
    kind: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    note: str = ""  # why the output channels were kept, when they were

    @property
    def removed(self) -> int:
        """Output channels this layer lost."""
        return self.out_before - self.out_after


@dataclass
class FamilyResult:
    layers: list[str]           # "module.param[dim]" slices that shrink together (abridged)
    channels: int               # classes in the family (its width in removal units)
    removed: int
    status: str                 # "pruned" | "rolled back"
    reason: str = ""


@dataclass
class ChannelPruningReport:
    """What ``prune_channels`` did: per layer, per coupled family, totals, and what it left alone and why.

    ``rule_failures`` lists every op whose channel rule raised: those ops' channels were all kept (the safe
    choice), so a model that prunes less than expected says here which op and which error made it so."""

    ran: bool = False                 # the pruned model ran on the example inputs with its output shapes kept
    traced: bool = False
    criterion: str = ""               # e.g. "lowest 50% by magnitude (l2)", "bn importance below 0.01"
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    layers: list[LayerChange] = field(default_factory=list)
    families: list[FamilyResult] = field(default_factory=list)
    rule_failures: list[RuleFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def pruned_layers(self) -> list[LayerChange]:
        return [lc for lc in self.layers if (lc.in_after, lc.out_after) != (lc.in_before, lc.out_before)]

    def removed(self) -> dict[str, int]:
        """Output channels each layer lost (every conv / linear / attention layer, 0 for the untouched)."""
        return {lc.name: lc.removed for lc in self.layers}

    def unpruned(self) -> dict[str, str]:
        """Layers whose output channels were all kept, with the reason."""
        return {lc.name: lc.note for lc in self.layers if lc.out_after == lc.out_before}

    def __str__(self) -> str:
        params = f"{self.params_before:,} -> {self.params_after:,} ({_ratio(self.params_after, self.params_before)})"
        flops = f"{self.flops_before:,} -> {self.flops_after:,} ({_ratio(self.flops_after, self.flops_before)})"
        head = f"prune_channels ({self.criterion}): ran={self.ran} traced={self.traced} params {params}, FLOPs {flops}"
        lines = [head]
        lines.extend(f"RULE FAILED: {f}; its channels were kept" for f in self.rule_failures)
        width = max((len(lc.name) for lc in self.layers), default=4)
        lines.append(f"{'layer'.ljust(width)}  {'kind':<20} {'in':>11} {'out':>11} {'lost':>5}  note")
        for lc in self.layers:
            lines.append(f"{lc.name.ljust(width)}  {lc.kind:<20} {lc.in_before:>5}->{lc.in_after:<5} "
                         f"{lc.out_before:>5}->{lc.out_after:<5} {lc.removed:>5}  {lc.note}")
        for fam in self.families:
            if fam.status == "rolled back":
                lines.append(f"rolled back: {', '.join(fam.layers[:4])}: {fam.reason}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _ratio(a, b):
    return f"{a / b:.1%}" if b else "n/a"


def layer_shapes(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """(kind, input channels, output channels) of every conv, linear and attention layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = (type(m).__name__, m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (type(m).__name__, m.in_features, m.out_features)
        elif isinstance(m, nn.MultiheadAttention):
            out[name] = (type(m).__name__, m.embed_dim, m.embed_dim)
    return out


def layer_changes(model: nn.Module, before: dict, g: ChannelGraph | None, rolled: dict[int, str]
                  ) -> list[LayerChange]:
    """One row per layer of ``before`` (:func:`layer_shapes` of the dense model), with why it kept its outputs."""
    after = layer_shapes(model)
    rows = []
    for name, (kind, cin, cout) in before.items():
        _, cin2, cout2 = after.get(name, (kind, cin, cout))
        note = ""
        if cout2 == cout:
            note = _why_kept(name, g, rolled) if g is not None else "model not traced"
        rows.append(LayerChange(name, kind, cin, cin2, cout, cout2, note))
    return rows


def _why_kept(name: str, g: ChannelGraph, rolled: dict[int, str]) -> str:
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
        r = g.pin_reason(c)
        if r and r not in reasons:
            reasons.append(r)
    if reasons:
        return "; ".join(reasons[:2]) + (" ..." if len(reasons) > 2 else "")
    fam = g.family(int(lab[lab >= 0][0])) if (lab >= 0).any() else None
    if fam in rolled:
        return f"rolled back: {rolled[fam]}"
    return "nothing to remove at this ratio / threshold / round_to"
