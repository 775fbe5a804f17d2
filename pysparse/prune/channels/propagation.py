"""Label propagation: run the traced graph on the example inputs and, node by node, compute the labels of every
output with the rule the table (:mod:`.rules`) holds for the node's op.

An op without a rule, or one its rule does not understand, keeps every channel it touches (pinned, with a
note). A rule that raises is a *rule failure*: the same conservative choice, and the failure is recorded on the
graph by node, op and error (the report lists it) so that a bug never quietly shrinks what is pruned.
"""
from __future__ import annotations

import torch
from torch import fx, nn

# the rule modules fill the table when imported
from . import elementwise_rules, layer_rules, shape_rules  # noqa: F401 - imported for their registrations
from .graph import ChannelGraph, RuleFailure, TensorLabels
from .rules import CHANNEL_RULES, ChannelRules, OpCall, OpNotUnderstood, RuleContext, flat_instances, op_name
from .shape_rules import size_arithmetic
from .tracing import MODULE_PATH, TraceFailure, trace_model

__all__ = ["build_channel_graph"]


class _Failed:
    """The value of a node that could not run (and of everything computed from it)."""


_FAILED = _Failed()


def _holds(obj, cls) -> bool:
    """Whether nested tuples / lists / dicts ``obj`` hold an instance of ``cls``."""
    return next(flat_instances(obj, cls), None) is not None


class _LabelPropagation(fx.Interpreter):
    """Runs the traced graph on real inputs and computes, node by node, the labels of every output."""

    def __init__(self, gm: fx.GraphModule, g: ChannelGraph, mode: str, rules: ChannelRules):
        super().__init__(gm, garbage_collect_values=True)
        self.g = g
        self.mode = mode  # "eval" or "train": which traced graph this is
        self.rules = rules
        self.ctx = RuleContext(g)
        self.labels = self.ctx.node_labels

    def run_node(self, n):
        arg_labels = fx.node.map_arg(n.args, lambda a: self.labels.get(a))
        kwarg_labels = fx.node.map_arg(n.kwargs, lambda a: self.labels.get(a))
        where = f"{n.meta.get(MODULE_PATH) or 'model'} ({n.name})"
        self.ctx.where = where
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            failed = _holds((args, kwargs), _Failed)
            if not failed:
                try:
                    result = getattr(self, n.op)(n.target, args, kwargs)
                except Exception as exc:  # e.g. an auxiliary head too small for this input
                    if n.op in ("placeholder", "output"):
                        raise
                    failed = f"{type(exc).__name__}: {str(exc)[:100]}"
        if failed:
            # This graph cannot run at the example size past here: keep what feeds the rest of it.
            reason = f"feeds {where}, which does not run on the example inputs in {self.mode} mode"
            if failed is not True:
                self.g.notes.append(f"{where}: does not run on the example inputs in {self.mode} mode "
                                    f"({failed}); channels feeding it are kept")
            self.ctx.pin_all((arg_labels, kwarg_labels), reason)
            self.labels[n] = None
            return _FAILED
        self.labels[n] = self._labels(n, args, kwargs, arg_labels, kwarg_labels, result, where)
        return result

    def _labels(self, n, args, kwargs, arg_labels, kwarg_labels, result, where):
        ctx = self.ctx
        if n.op == "placeholder":
            return ctx.fixed_like(result, "model input")
        if n.op == "output":
            ctx.pin_all(arg_labels, "model output")
            return None
        if n.op == "get_attr":
            return self.g.labels_of(result) if isinstance(result, torch.Tensor) else None
        target = self.module.get_submodule(n.target) if n.op == "call_module" else n.target
        call = OpCall(n, target, args, kwargs, arg_labels, kwarg_labels, result)
        try:
            if n.op == "call_function" and not _holds((args, kwargs), torch.Tensor):
                return size_arithmetic(ctx, call)
            rule = self.rules.lookup(n, target)
            if n.op == "call_method" and not isinstance(args[0], torch.Tensor):
                raise OpNotUnderstood(f"method {n.target} on a {type(args[0]).__name__}")
            if rule is None:
                kind = {"call_module": "module", "call_method": "method"}.get(n.op, "function")
                raise OpNotUnderstood(f"{kind} {op_name(target)} is not understood")
            return rule(ctx, call)
        except OpNotUnderstood as why:
            return self._keep_channels(target, arg_labels, kwarg_labels, result, f"{why} at {where}",
                                       note=f"{where}: {why}: channels through it are kept")
        except Exception as exc:  # noqa: BLE001 - a rule that trips: keep everything it touches (always safe)
            op = op_name(target) if n.op != "call_module" else f"{n.target} ({op_name(target)})"
            failure = RuleFailure(n.name, op, n.meta.get(MODULE_PATH) or "model", f"{type(exc).__name__}: {exc}")
            if failure not in self.g.rule_failures:  # the eval and the train graph usually share the node
                self.g.rule_failures.append(failure)
            return self._keep_channels(target, arg_labels, kwarg_labels, result, f"{failure}; its channels are kept",
                                       note=None)

    def _keep_channels(self, target, arg_labels, kwarg_labels, result, reason, note):
        """The conservative answer for an op not analysed: its inputs, its output and (for a module) its own
        tensors keep every channel, whatever its rule coupled or marked before it gave up."""
        if note and _holds((arg_labels, kwarg_labels), TensorLabels):
            self.g.notes.append(note)
        self.ctx.pin_all((arg_labels, kwarg_labels), reason)
        if isinstance(target, nn.Module):
            own = list(target.parameters()) + list(target.buffers())
            self.ctx.pin_all([self.g.labels_of(t) for t in own], reason)
        return self.ctx.fixed_like(result, reason)


def _clone_inputs(example_inputs):
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)


def build_channel_graph(model: nn.Module, example_inputs: tuple, rules: ChannelRules = CHANNEL_RULES
                        ) -> ChannelGraph:
    """Trace ``model`` in eval and in train mode and couple channel classes across both graphs.

    Both graphs run with every leaf module in eval mode (no statistics updated, no dropout noise); tracing in
    train mode adds what only training runs (auxiliary heads, stochastic depth), so no consumer of a pruned
    tensor is missed. Raises TraceFailure when neither mode can be traced.
    """
    g = ChannelGraph(model)
    was_training = model.training
    traced = []
    errors = []
    try:
        for mode in (False, True):
            model.train(mode)
            try:
                gm = trace_model(model, g.notes)
            except TraceFailure as exc:
                errors.append(f"{'train' if mode else 'eval'} mode: {exc}")
                continue
            traced.append((mode, gm))
        if not traced:
            raise TraceFailure("; ".join(errors))
        for msg in errors:
            g.notes.append(f"could not trace in {msg}; using the other mode's graph only")
        model.eval()
        with torch.no_grad():
            for mode, gm in traced:
                _LabelPropagation(gm, g, "train" if mode else "eval", rules).run(*_clone_inputs(example_inputs))
    finally:
        model.train(was_training)
    return g
