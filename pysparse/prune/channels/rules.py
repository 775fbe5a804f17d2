"""The table of channel rules: per op (a function, a tensor method name or a module type), how it couples channels.

A rule is ``rule(ctx, call) -> labels``: it reads the labels of the op's inputs (``call.arg_labels``), couples
or pins them on ``ctx.graph``, and returns the labels of the op's output (a :class:`TensorLabels`, a tuple of
them, a :class:`SizeOrigin` for an int read from sizes, or None). Supporting a new op is one entry::

    @channel_rule(my_library.gated_activation)      # or a method name ("gate"), or a module type (MyGate)
    def gated_activation(ctx, call):                # one tensor in, the same channels out
        return ctx.check(call.first_labels, call.result)

A rule raises :class:`OpNotUnderstood` when this use of the op is beyond it (e.g. advanced indexing): the op's
channels are kept, with a note. Any other exception is a *rule failure*: the op's channels are kept too, and
the failure is reported by name (:attr:`ChannelPruningReport.rule_failures`), so a bug in a rule never quietly
shrinks what is pruned. An op with no rule is not understood.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .graph import ChannelGraph, TensorLabels

__all__ = ["CHANNEL_RULES", "ChannelRules", "OpCall", "OpNotUnderstood", "RuleContext", "channel_rule",
           "register_channel_rule"]


class OpNotUnderstood(Exception):
    """This use of an op is beyond its rule (or it has none): every channel through it keeps its size."""


@dataclass
class OpCall:
    """One executed fx node: its concrete arguments and result, and the labels of its arguments."""

    node: fx.Node
    target: object                  # the function, the method name, or the module instance
    args: tuple
    kwargs: dict
    arg_labels: tuple               # labels of args (None for an argument without labels)
    kwarg_labels: dict
    result: object

    @property
    def first_labels(self) -> TensorLabels | None:
        """Labels of the first tensor argument (positional first, then keyword)."""
        return next(flat_labels((self.arg_labels, self.kwarg_labels)), None)

    def arg(self, i: int, name: str, default=None):
        """Concrete value of the argument at position ``i`` or keyword ``name``."""
        return argument(self.args, self.kwargs, i, name, default)

    def labels(self, i: int, name: str):
        """Labels of the argument at position ``i`` or keyword ``name``."""
        return argument(self.arg_labels, self.kwarg_labels, i, name)

    def literal(self, i: int):
        """The argument at position ``i`` as written in the graph (an fx.Node where it was computed)."""
        return self.node.args[i] if len(self.node.args) > i else None


class RuleContext:
    """What a rule works with: the graph, where the op runs (for reasons), and label helpers."""

    def __init__(self, graph: ChannelGraph):
        self.graph = graph
        self.where = "model"
        self.node_labels: dict[fx.Node, object] = {}  # labels of every node run so far (sizes in view() are nodes)

    def check(self, labels: TensorLabels, value) -> TensorLabels:
        """``labels`` if they match ``value``'s shape; a rule that got its bookkeeping wrong stops here."""
        if not isinstance(value, torch.Tensor) or [len(a) for a in labels.dims] != list(value.shape):
            raise OpNotUnderstood("shape bookkeeping mismatch")
        return labels

    def fixed_like(self, value, reason: str | None = None):
        """Fixed labels (positions that never shrink) shaped like ``value``."""
        if isinstance(value, torch.Tensor):
            return TensorLabels(self.graph.fixed_labels(s, reason) for s in value.shape)
        if isinstance(value, (tuple, list)):
            return tuple(self.fixed_like(v, reason) for v in value)
        return None

    def pin_all(self, labels, reason: str) -> None:
        for lab in flat_labels(labels):
            for a in lab.dims:
                self.graph.pin(a, reason)


def argument(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def flat_instances(obj, cls):
    """Every instance of ``cls`` inside nested tuples, lists and dicts."""
    if isinstance(obj, cls):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from flat_instances(o, cls)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from flat_instances(o, cls)


def flat_labels(obj):
    """Every TensorLabels inside nested tuples, lists and dicts."""
    return flat_instances(obj, TensorLabels)


def op_name(target) -> str:
    """Readable name of a node's target: ``torch.cat``, ``view``, ``layer1.0.conv1 (Conv2d)``."""
    if isinstance(target, str):
        return target
    if isinstance(target, nn.Module):
        return type(target).__name__
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


_KINDS = ("function", "function_name", "method", "module", "module_name")
# in-place methods that are not elementwise: they must not fall back to the elementwise rule
_INPLACE_NOT_ELEMENTWISE = {"resize_", "set_", "transpose_", "t_", "squeeze_", "unsqueeze_", "as_strided_",
                            "index_add_", "scatter_", "scatter_add_", "index_copy_", "index_fill_", "put_",
                            "masked_scatter_", "copy_"}


class ChannelRules:
    """Rules keyed by op. Functions match by identity, then by ``__name__`` (for third-party functions that fx
    keeps as one node, e.g. torchvision's ``stochastic_depth``, without importing their library); methods by
    name; modules by type along the class hierarchy, then by class name."""

    def __init__(self):
        self.tables: dict[str, dict] = {kind: {} for kind in _KINDS}
        self.inplace_elementwise = None  # rule for in-place methods (``x.mul_(s)``) that have no entry

    def register(self, op, rule, *, kind: str | None = None, replace: bool = False) -> None:
        """Register ``rule`` for ``op``. ``kind`` defaults to "module" for an nn.Module subclass, "method" for a
        string and "function" for a callable; "function_name" / "module_name" match by name. Registering an op
        twice raises ValueError unless ``replace=True`` (two rules for one op would depend on import order)."""
        if kind is None:
            if isinstance(op, type) and issubclass(op, nn.Module):
                kind = "module"
            elif isinstance(op, str):
                kind = "method"
            elif callable(op):
                kind = "function"
            else:
                raise TypeError(f"op must be a function, a method name or an nn.Module subclass, got {op!r}")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if not callable(rule):
            raise TypeError(f"rule must be callable (ctx, call) -> labels, got {type(rule).__name__}")
        table = self.tables[kind]
        if op in table and not replace:
            raise ValueError(f"{op_name(op)} already has a channel rule ({table[op].__name__}); pass replace=True")
        table[op] = rule

    def unregister(self, op, *, kind: str | None = None) -> None:
        kinds = [kind] if kind is not None else _KINDS
        for k in kinds:
            self.tables[k].pop(op, None)

    def lookup(self, node: fx.Node, target):
        """The rule for a call_function / call_method / call_module node (``target``: the module for the latter),
        or None."""
        t = self.tables
        if node.op == "call_module":
            for cls in type(target).__mro__:
                if cls in t["module"]:
                    return t["module"][cls]
            return t["module_name"].get(type(target).__name__)
        if node.op == "call_method":
            rule = t["method"].get(target)
            if rule is None and target.endswith("_") and not target.startswith("_") and \
                    target not in _INPLACE_NOT_ELEMENTWISE:
                rule = self.inplace_elementwise  # in place: self is one of the operands
            return rule
        try:
            rule = t["function"].get(target)
        except TypeError:  # an unhashable callable
            rule = None
        return rule if rule is not None else t["function_name"].get(getattr(target, "__name__", None))


CHANNEL_RULES = ChannelRules()


def channel_rule(*ops, kind: str | None = None):
    """Decorator: register the function as the channel rule of every op in ``ops``."""
    def deco(rule):
        for op in ops:
            CHANNEL_RULES.register(op, rule, kind=kind)
        return rule
    return deco


def register_channel_rule(op, rule, *, kind: str | None = None, replace: bool = False) -> None:
    """Register ``rule(ctx, call) -> labels`` for ``op`` in the table every ``prune_channels`` call uses."""
    CHANNEL_RULES.register(op, rule, kind=kind, replace=replace)
