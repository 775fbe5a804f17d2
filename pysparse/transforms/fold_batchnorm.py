"""fold_batchnorm(): fold each BatchNorm that directly follows a Conv2d / Linear into that layer (inference only).

In eval mode a BatchNorm is a per-channel affine map of its input, so after a convolution it can be merged into
the convolution's weight and bias::

    s[o]  = gamma[o] / sqrt(running_var[o] + eps)
    W'[o] = W[o] * s[o]
    b'[o] = (b[o] - running_mean[o]) * s[o] + beta[o]

and the BatchNorm becomes ``nn.Identity``. Scaling rows keeps zero blocks zero, so run it on the pruned dense model
*before* :func:`pysparse.sparsify` (or pass ``sparsify(..., fold_batchnorm=True)``): the packed layers then carry
the fold and the sparsity pattern is unchanged. Layers that are already pysparse layers are not folded into.

The pairs are found on the model's torch.fx graph, which says who feeds whom; the weights are changed on the model
itself, which keeps its class, attributes and state-dict names (minus the BatchNorm entries).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .._module_hooks import has_forward_hooks
from .._text_table import left_aligned
from ..prune.mask_holding import WeightMask

__all__ = ["fold_batchnorm", "FoldEntry", "FoldReport"]

_PAIRS = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}


@dataclass
class FoldEntry:
    """What fold_batchnorm did with one BatchNorm module."""
    bn: str                    # the BatchNorm's name in the model
    layer: str | None          # the Conv2d / Linear feeding it, when its input is one
    folded: bool
    reason: str


class FoldReport:
    """Per-BatchNorm decisions of :func:`fold_batchnorm` (``model.fold_report``); ``str()`` gives a table."""

    def __init__(self, entries: list[FoldEntry], error: str | None = None):
        self.entries = entries
        self.error = error     # why nothing was looked at (the model could not be traced), or None

    @property
    def folded(self) -> list[tuple[str, str]]:
        """``(layer name, BatchNorm name)`` of every folded pair."""
        return [(e.layer, e.bn) for e in self.entries if e.folded]

    @property
    def skipped(self) -> list[FoldEntry]:
        return [e for e in self.entries if not e.folded]

    def __getitem__(self, bn_name: str) -> FoldEntry:
        for e in self.entries:
            if e.bn == bn_name:
                return e
        raise KeyError(f"no BatchNorm named {bn_name!r} in the report")

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict:
        return {"error": self.error, "entries": [asdict(e) for e in self.entries]}

    def __str__(self) -> str:
        head = ("batchnorm", "layer", "folded", "reason")
        rows = [(e.bn, e.layer or "-", "yes" if e.folded else "no", e.reason) for e in self.entries]
        lines = left_aligned(head, rows)
        if self.error:
            lines.append(f"nothing folded: {self.error}")
        lines.append(f"{len(self.folded)}/{len(self.entries)} BatchNorm layers folded")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"FoldReport({len(self.folded)}/{len(self.entries)} BatchNorm layers folded)"


def check_inference(model: nn.Module, what: str = "fold_batchnorm") -> None:
    """Refuse a model in training mode: folding uses the running statistics, which training would still update."""
    if model.training:
        raise ValueError(f"{what} is inference-only: model must be in eval mode (model.training=False), got "
                         f"training=True; call model.eval() first")


def _is_pysparse(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == __name__.split(".")[0]


class _Tracer(fx.Tracer):
    """Keeps every Conv2d / Linear / BatchNorm (subclasses included) one node, so who feeds whom is visible, and
    pysparse layers too (their forward is not traceable, and nothing folds into them)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm)) or _is_pysparse(m)
                or super().is_leaf_module(m, qualname))


def _describe(node) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant {node!r}"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target!r}"


def _weight_target(layer: nn.Module) -> tuple[torch.Tensor | None, str | None]:
    """The tensor to scale for ``layer.weight`` (the unmasked original under pysparse masks), or why there is none."""
    if parametrize.is_parametrized(layer, "bias"):
        return None, "its bias is parametrized"
    if not parametrize.is_parametrized(layer, "weight"):
        return layer.weight, None
    chain = layer.parametrizations.weight
    # where(mask, original * s, 0) == where(mask, original, 0) * s: row scaling commutes with a held mask only.
    if all(isinstance(p, WeightMask) for p in chain):
        return chain.original, None
    return None, f"its weight has parametrizations other than pysparse masks ({[type(p).__name__ for p in chain]})"


def _why_not_layer(name: str, layer: nn.Module, bn: nn.Module, calls: int, users: list,
                   read_attrs: set[str], weight_uses: dict[int, int]) -> str | None:
    base = next(b for b in _PAIRS if isinstance(layer, b))
    if type(layer).forward is not base.forward:
        return f"{name!r} ({type(layer).__name__}) overrides {base.__name__}.forward"
    if not isinstance(bn, _PAIRS[base]):
        return f"{type(bn).__name__} after {base.__name__} {name!r} (only Conv2d -> BatchNorm2d and " \
               f"Linear -> BatchNorm1d fold)"
    if calls > 1:
        return f"{name!r} is called {calls} times in forward (folding would change its other outputs)"
    if len(users) > 1:
        others = ", ".join(_describe(u) for u in users[1:])
        return f"the output of {name!r} also feeds {others}"
    if has_forward_hooks(layer):
        return f"{name!r} has forward hooks (they would see the folded output)"
    if name in read_attrs:
        return f"forward reads the parameters of {name!r} directly"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{name!r} is a lazy module not initialised yet"
    target, why = _weight_target(layer)
    if why is not None:
        return f"{name!r}: {why}"
    if weight_uses.get(id(target), 0) > 1 or (layer.bias is not None and weight_uses.get(id(layer.bias), 0) > 1):
        return f"the weight or bias of {name!r} is shared with another module (tied)"
    out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    if bn.num_features != out:
        return f"BatchNorm num_features={bn.num_features} != {out} outputs of {name!r}"
    return None


def _fold_pair(layer: nn.Module, bn: _BatchNorm) -> None:
    """W <- W * s (per output row), b <- (b - mean) * s + beta, with s = gamma / sqrt(var + eps)."""
    target, _ = _weight_target(layer)
    dev = target.device
    acc = torch.float32 if dev.type == "mps" else torch.float64   # mps has no float64
    with torch.no_grad():
        mean, var = bn.running_mean.to(dev, acc), bn.running_var.to(dev, acc)
        scale = torch.rsqrt(var + bn.eps)
        shift = -mean
        if layer.bias is not None:
            shift = shift + layer.bias.to(acc)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dev, acc)
        shift = shift * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(dev, acc)
        target.copy_(target.to(acc) * scale.reshape(-1, *[1] * (target.dim() - 1)))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(target.dtype), requires_grad=target.requires_grad)
        else:
            layer.bias.copy_(shift)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows an ``nn.Conv2d`` / ``nn.Linear`` into that layer (eval only).

    A pair ``layer -> bn`` is folded when the BatchNorm's only input is the layer's output, that output feeds
    nothing else, each is called once in forward, and the BatchNorm has running statistics
    (``track_running_stats=True``). The layer's weight and bias absorb the BatchNorm (a bias is created when the
    layer had none) and the BatchNorm is replaced by ``nn.Identity`` wherever it is registered. Everything else is
    left as it is, with the reason in the report. The pairs are found with ``torch.fx``; a model fx cannot trace
    (e.g. data-dependent control flow in forward) is returned unchanged, with the trace error in the report.

    Run it on the dense (possibly pruned, masks held or not) model before :func:`pysparse.sparsify`: row scaling
    keeps pruned entries zero. A ``Linear -> BatchNorm1d`` pair is folded on the premise that the Linear's output
    is ``[N, features]``, the only case where BatchNorm1d normalises the Linear's features (BatchNorm1d on
    ``[N, L, F]`` normalises dim 1; that it runs at all needs ``L == F``).

    Args:
        model: an ``nn.Module`` in eval mode.
        inplace: modify ``model`` itself; by default a deep copy is folded and ``model`` is left untouched.
    Returns:
        The folded model (same class), with ``.fold_report`` (a :class:`FoldReport`): per BatchNorm whether it
        was folded, into which layer, and why not.
    Raises:
        ValueError: the model, or a BatchNorm that would be folded, is in training mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_inference(model)
    if not inplace:
        model = copy.deepcopy(model)
    bn_names = {id(m): n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        error = f"torch.fx could not trace the model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        model.fold_report = FoldReport([FoldEntry(n, None, False, "model not traceable") for n in bn_names.values()],
                                       error)
        return model

    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    read_attrs: set[str] = set()          # modules whose parameters/buffers forward reads itself
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            parts = node.target.split(".")
            read_attrs.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    weight_uses: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                weight_uses[id(p)] = weight_uses.get(id(p), 0) + 1

    entries: dict[str, FoldEntry] = {}
    pairs: list[tuple[nn.Module, _BatchNorm, FoldEntry]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm) or node.target in entries:
            continue
        name, bn = node.target, modules[node.target]
        entry = entries[name] = FoldEntry(name, None, False, "")
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        layer = modules[src.target] if isinstance(src, fx.Node) and src.op == "call_module" else None
        if isinstance(layer, tuple(_PAIRS)):
            entry.layer = src.target
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or type(bn).forward is not _BatchNorm.forward:
            entry.reason = f"{type(bn).__name__} is not a plain BatchNorm1d / BatchNorm2d"
        elif calls[name] > 1:
            entry.reason = f"called {calls[name]} times in forward"
        elif not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            entry.reason = "no running statistics (track_running_stats=False): it uses batch statistics in eval too"
        elif has_forward_hooks(bn):
            entry.reason = "has forward hooks"
        elif name in read_attrs:
            entry.reason = "forward reads its parameters or buffers directly"
        elif src is None:
            entry.reason = "called with more than one argument"
        elif entry.layer is None:
            hint = " (fold the dense model before sparsify)" if layer is not None and _is_pysparse(layer) else ""
            kind = f" ({type(layer).__name__})" if layer is not None else ""
            entry.reason = f"its input comes from {_describe(src)}{kind}, not an nn.Conv2d / nn.Linear{hint}"
        else:
            why = _why_not_layer(src.target, layer, bn, calls[src.target], list(src.users), read_attrs, weight_uses)
            if why is not None:
                entry.reason = why
            else:
                pairs.append((layer, bn, entry))
    for name in bn_names.values():
        if name not in entries:
            entries[name] = FoldEntry(name, None, False, "not called as a module by forward")

    training = [e.bn for _, bn, e in pairs if bn.training]
    if training:
        raise ValueError(f"fold_batchnorm is inference-only: every BatchNorm to fold must be in eval mode, got "
                         f"training=True for {training}; call model.eval() first")

    # Every place a BatchNorm is registered (a module may be reachable under several names).
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, child_name))
    for layer, bn, entry in pairs:
        _fold_pair(layer, bn)
        for parent, child_name in places.get(id(bn), []):
            setattr(parent, child_name, nn.Identity())
        entry.folded = True
        entry.reason = "sole consumer of the layer's output"
    model.fold_report = FoldReport([entries[n] for n in bn_names.values()])
    return model
