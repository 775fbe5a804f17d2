"""Fusing what a block's ``forward`` does right after a pysparse layer into that layer, by rewriting the forward
with ``torch.fx``.

Module swapping (activation_fusion) cannot reach ResNet's residual blocks: torchvision's Bottleneck computes
``out = self.bn3(self.conv3(out)); out += identity; out = self.relu(out)`` in code, with one ``self.relu`` shared by
three call sites. Here the block is traced (pysparse layers are leaves) and these chains, found node by node, become
one call of the layer, which then applies the add and the activation in its kernel's epilogue:

* ``layer -> [Identity ...] -> activation``                     becomes ``layer(x)`` with the activation fused;
* ``layer -> [Identity ...] -> add(., other) [-> activation]``  becomes ``layer(x, other)`` (a fused residual);
* ``linear -> [Identity ...] -> Dropout -> [Identity ...] -> add(., other) [-> activation]`` (transformers' BERT-style
  ``LayerNorm(dropout(dense(h)) + input)``) becomes ``linear(x, other, residual_dropout=dropout)``: the SparseLinear
  applies the dropout itself, in torch, while it is active (training, p > 0), and fuses the add otherwise (eval).

Every value in a chain must be read by the next node only (so ``other`` cannot depend on the layer's output), the
layer must be called once in the block and have no activation yet, and no module on the chain may have hooks.
``nn.Identity`` is what ``fold_batchnorm`` leaves of a BatchNorm. The layer adds ``other`` as torch's ``+`` would
(the kernel adds it only when it has exactly the output's shape), so the rewritten block computes what the
original did for any input. A block fx cannot trace (data-dependent control flow, ...) is left as it is.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from .._module_hooks import has_forward_hooks
from ..nn import SparseConv2d, SparseLinear
from .activation_fusion import activation_name, is_plain_identity

__all__ = ["ForwardFusion", "plan_forward_fusions", "apply_forward_fusions", "fusion_blocks", "recorded_fusions"]

# Set on a layer whose activation a rewritten forward gave it (an attribute of the layer: it survives deepcopy and
# pickling, which a GraphModule's own extra attributes do not both survive).
FUSED_IN_FORWARD = "pysparse_fused_in_forward"

_ADDS = (operator.add, operator.iadd, torch.add)
# Activation functions (not modules) that name one of the fusable activations whatever their extra arguments.
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}


@dataclass(frozen=True)
class ForwardFusion:
    """``layer`` (its name inside the block) now adds the block's residual (``residual``) and applies
    ``activation``, which the block's forward did after it."""
    layer: str
    activation: str | None
    residual: bool


class _Tracer(fx.Tracer):
    """Keeps pysparse layers whole (their forward branches on the input)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (SparseLinear, SparseConv2d)) or super().is_leaf_module(m, qualname)


def _activation_of(block: nn.Module, node: fx.Node) -> str | None:
    """The fusable activation ``node`` applies to its only input, or None."""
    if node.op == "call_module":
        module = block.get_submodule(node.target)
        return activation_name(module) if len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target] if len(node.args) == 1 and set(node.kwargs) <= {"inplace"} else None
    if node.op == "call_function" and node.target is F.gelu:
        exact = node.kwargs.get("approximate", "none") == "none"
        return "gelu" if len(node.args) == 1 and set(node.kwargs) <= {"approximate"} and exact else None
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target] if len(node.args) == 1 and not node.kwargs else None
    return None


def _plain_identity(block: nn.Module, node: fx.Node) -> bool:
    return (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
            and is_plain_identity(block.get_submodule(node.target)))


def _plain_dropout(block: nn.Module, node: fx.Node) -> bool:
    return (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
            and type(block.get_submodule(node.target)) is nn.Dropout)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def plan_forward_fusions(block: nn.Module, layer_at) -> tuple[fx.Graph, list[ForwardFusion]] | None:
    """The traced and rewritten graph of ``block`` and what it fuses, or None when fx cannot trace the block or
    nothing fuses. ``layer_at(name, module)`` gives the pysparse layer that is (or will be, when a checkpoint is
    loaded) at ``block.<name>`` and may absorb a chain, or None; ``block`` itself is not changed (see
    :func:`apply_forward_fusions`)."""
    if has_forward_hooks(block):
        return None
    try:
        graph = _Tracer().trace(block)
    except Exception:  # noqa: BLE001 - any tracing failure means: leave the block as it is
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fusions = []
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        layer = layer_at(node.target, block.get_submodule(node.target))
        if (not isinstance(layer, (SparseLinear, SparseConv2d)) or layer.activation is not None
                or has_forward_hooks(layer)):
            continue
        chain, end = [], node          # the layer's output through Identities: end is the last of them
        dropout = None                 # or through one nn.Dropout, when a residual add follows (BERT's outputs)
        while (user := _only_user(end)) is not None:
            if dropout is None and isinstance(layer, SparseLinear) and _plain_dropout(block, user):
                dropout = user
            elif not _plain_identity(block, user):
                break
            chain.append(user)
            end = user
        user = _only_user(end)
        other = None
        if (user is not None and user.target in _ADDS and user.op == "call_function" and len(user.args) == 2
                and not user.kwargs and all(isinstance(a, fx.Node) for a in user.args)):
            # Every value from the layer to the add has one reader, so `other` cannot be computed from the layer's
            # output unless it is that very value (add(y, y)).
            other = user.args[1] if user.args[0] is end else user.args[0]
            if other is end:
                other = None
            else:
                chain.append(user)
                end = user
                user = _only_user(end)
        activation = _activation_of(block, user) if user is not None else None
        if activation is not None:
            chain.append(user)
            end = user
        if (other is None and activation is None) or (dropout is not None and other is None):
            continue
        with graph.inserting_before(end):
            kwargs = {"residual": other} if other is not None else {}
            if dropout is not None:
                kwargs["residual_dropout"] = graph.get_attr(dropout.target)
            fused = graph.call_module(node.target, node.args, kwargs)
        end.replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.erase_node(n)
        graph.erase_node(node)
        fusions.append(ForwardFusion(node.target, activation, other is not None))
    if not fusions:
        return None
    graph.lint()
    return graph, fusions


def apply_forward_fusions(block: nn.Module, graph: fx.Graph, fusions: list[ForwardFusion]) -> fx.GraphModule:
    """Sets each fused layer's activation and returns the block with ``graph`` as its forward (a GraphModule that
    shares ``block``'s submodules and parameters), to put in ``block``'s place."""
    for f in fusions:
        layer = block.get_submodule(f.layer)
        layer.activation, layer.activation_source = f.activation, None
        setattr(layer, FUSED_IN_FORWARD, True)
    module = fx.GraphModule(block, graph, class_name=type(block).__name__)
    return module.train(block.training)


def recorded_fusions(block: nn.Module) -> list[ForwardFusion]:
    """What :func:`apply_forward_fusions` fused in ``block`` (a GraphModule it made; [] for any other module),
    read back from the graph and the layers."""
    if not isinstance(block, fx.GraphModule):
        return []
    found = []
    for node in block.graph.nodes:
        if node.op == "call_module":
            layer = block.get_submodule(node.target)
            if getattr(layer, FUSED_IN_FORWARD, False):
                found.append(ForwardFusion(node.target, layer.activation, "residual" in node.kwargs))
    return found


def fusion_blocks(model: nn.Module, is_layer) -> list[tuple[str, nn.Module]]:
    """The submodules (not the root) worth tracing, innermost first: a forward of their own (not nn.Sequential's)
    and a layer ``is_layer(module)`` among their children or their nn.Sequential children's."""
    def owns(m: nn.Module) -> bool:
        return any(is_layer(c) or (type(c) is nn.Sequential and any(is_layer(g) for g in c.children()))
                   for c in m.children())
    blocks = [(name, m) for name, m in model.named_modules()
              if name and type(m).forward is not nn.Sequential.forward and not is_layer(m) and owns(m)]
    return blocks[::-1]
