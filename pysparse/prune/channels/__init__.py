"""Structural channel pruning: remove channels physically, consistently across every layer that shares them.

How it is built, one module per step:

- :mod:`.tracing`: torch.fx traces the model (a submodule it cannot trace stays an opaque block).
- :mod:`.propagation`: the traced graph runs on the example inputs and every op couples channel dims, as the
  rule the table holds for it says; the result is a :class:`ChannelGraph` (:mod:`.graph`).
- :mod:`.rules`: the table of per-op rules (function, method name or module type -> rule), filled by
  :mod:`.elementwise_rules`, :mod:`.shape_rules` and :mod:`.layer_rules`; :func:`register_channel_rule` adds one.
- :mod:`.planning`: importance per channel (weight magnitude or BatchNorm gamma), and which channels go.
- :mod:`.surgery`: removing them from the tensors, undoably, and the record a checkpoint replays.
- :mod:`.pruning`: :func:`prune_channels`, which runs the pruned model and rolls back what breaks it;
  :mod:`.report`: what it did.
"""
from .graph import ChannelGraph, RuleFailure
from .propagation import build_channel_graph
from .pruning import prune_channels
from .report import ChannelPruningReport
from .rules import OpNotUnderstood, register_channel_rule
from .surgery import apply_channel_surgery, channel_surgery_record
from .tracing import TraceFailure

__all__ = ["ChannelGraph", "ChannelPruningReport", "OpNotUnderstood", "RuleFailure", "TraceFailure",
           "apply_channel_surgery", "build_channel_graph", "channel_surgery_record", "prune_channels",
           "register_channel_rule"]
