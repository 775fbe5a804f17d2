"""Channel rules for layers with weights: convolutions and linears *produce* channels (their output rows are
what pruning removes) and consume their input's; normalisations, PReLU and attention follow the channels they
are applied to. Each layer has a module rule and, where torch has one, a rule for its functional form."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .graph import SPATIAL, TensorLabels
from .rules import OpNotUnderstood, RuleContext, channel_rule


# ---- convolution and linear -----------------------------------------------------------------------------------
def conv_labels(ctx: RuleContext, x, w, b, groups: int, result, weight) -> TensorLabels:
    g = ctx.graph
    spatial = len(w) - 2
    cdim = len(x) - spatial - 1
    if cdim not in (0, 1):
        raise OpNotUnderstood("convolution input of unexpected rank")
    xc, c_in, c_out = x[cdim], len(x[cdim]), len(w[0])
    if groups == 1:
        g.couple(xc, w[1])
        mode = "dense"
    elif c_in // groups == 1:
        # Every group reads one input channel: removing an input channel removes its whole group.
        g.couple(np.repeat(xc, c_out // groups), w[0])
        g.pin(w[1], "input dim of a depthwise kernel (one channel per group)")
        mode = "depthwise"
    else:
        # Grouped: keep the group count and remove the same positions in every group.
        cout_g = c_out // groups
        g.couple(xc, np.tile(w[1], groups))
        g.couple(w[0][cout_g:], np.tile(w[0][:cout_g], groups - 1))
        mode = "grouped"
    if b is not None:
        g.couple(w[0], b[0])
    g.mark_producer(w[0])
    for a in x.dims[cdim + 1:]:
        g.pin(a, SPATIAL)
    for a in w.dims[2:]:
        g.pin(a, "kernel spatial dim")
    if g.conv_modes.setdefault(id(weight), mode) != mode:
        raise OpNotUnderstood("convolution weight used with different group structures")
    out_spatial = [g.fixed_labels(s) for s in result.shape[cdim + 1:]]
    return ctx.check(TensorLabels(x.dims[:cdim] + [w[0]] + out_spatial), result)


@channel_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(ctx, call):
    m, g = call.target, ctx.graph
    return conv_labels(ctx, call.first_labels, g.labels_of(m.weight), g.labels_of(m.bias), m.groups, call.result,
                       m.weight)


@channel_rule(*{F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d})
def conv_function(ctx, call):
    return conv_labels(ctx, call.arg_labels[0], call.labels(1, "weight"), call.labels(2, "bias"),
                       call.arg(6, "groups", 1), call.result, call.arg(1, "weight"))


def linear_labels(ctx: RuleContext, x, w, b) -> TensorLabels:
    g = ctx.graph
    g.couple(x[-1], w[1])
    if b is not None:
        g.couple(w[0], b[0])
    g.mark_producer(w[0])
    return TensorLabels(x.dims[:-1] + [w[0]])


@channel_rule(nn.Linear)
def linear_module(ctx, call):
    m, g = call.target, ctx.graph
    return ctx.check(linear_labels(ctx, call.first_labels, g.labels_of(m.weight), g.labels_of(m.bias)),
                     call.result)


@channel_rule(F.linear)
def linear_function(ctx, call):
    return ctx.check(linear_labels(ctx, call.arg_labels[0], call.labels(1, "weight"), call.labels(2, "bias")),
                     call.result)


# ---- normalisation and per-channel scales ---------------------------------------------------------------------
def _follow_channel_dim(ctx: RuleContext, x, param_labels) -> TensorLabels:
    """Per-channel parameters and statistics (dim 0) follow the input's channel dim (1, or 0 when unbatched)."""
    cdim = 1 if len(x) > 1 else 0
    for lab in param_labels:
        if lab is not None:
            ctx.graph.couple(x[cdim], lab[0])
    return x


@channel_rule(nn.modules.batchnorm._NormBase)
def batch_norm_module(ctx, call):
    m, g = call.target, ctx.graph
    if m.weight is None and m.running_mean is None:
        raise OpNotUnderstood(f"{type(m).__name__} without parameters or statistics (num_features cannot follow)")
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
        g.bn_scales[id(m.weight)] = m.weight
    tensors = (m.weight, m.bias, m.running_mean, m.running_var)
    return ctx.check(_follow_channel_dim(ctx, call.first_labels, [g.labels_of(t) for t in tensors]), call.result)


@channel_rule(F.batch_norm)
def batch_norm_function(ctx, call):
    weight = call.arg(3, "weight")
    if weight is not None and ctx.graph.tensor_name(weight) is not None:
        ctx.graph.bn_scales[id(weight)] = weight
    labels = [call.labels(i, k) for i, k in ((3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var"))]
    return ctx.check(_follow_channel_dim(ctx, call.arg_labels[0], labels), call.result)


def layer_norm_labels(ctx: RuleContext, x, normalized_dims: int, weight, bias) -> TensorLabels:
    g = ctx.graph
    if weight is None:
        for a in x.dims[-normalized_dims:]:
            g.pin(a, "LayerNorm without affine parameters (its normalized_shape cannot follow)")
        return x
    for t in (weight, bias):
        lab = g.labels_of(t)
        if lab is not None:
            for a, b in zip(x.dims[-normalized_dims:], lab.dims):
                g.couple(a, b)
    return x


@channel_rule(nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
@channel_rule("RMSNorm", kind="module_name")  # RMSNorm classes of libraries that predate nn.RMSNorm
def layer_norm_module(ctx, call):
    m = call.target
    if not hasattr(m, "normalized_shape"):
        raise OpNotUnderstood(f"{type(m).__name__} without a normalized_shape")
    return ctx.check(layer_norm_labels(ctx, call.first_labels, len(m.normalized_shape), m.weight,
                                       getattr(m, "bias", None)), call.result)


@channel_rule(F.layer_norm)
def layer_norm_function(ctx, call):
    weight = call.arg(2, "weight")
    name = ctx.graph.tensor_name(weight) if weight is not None else None
    owner = ctx.graph.model.get_submodule(name.rpartition(".")[0]) if name else None
    # the size to follow is the owner's normalized_shape: only an nn.LayerNorm's is updated by the surgery
    if not isinstance(owner, nn.LayerNorm):
        raise OpNotUnderstood("layer_norm whose normalized_shape is not held by an nn.LayerNorm")
    return ctx.check(layer_norm_labels(ctx, call.arg_labels[0], len(call.arg(1, "normalized_shape")), weight,
                                       call.arg(3, "bias")), call.result)


def group_norm_labels(ctx: RuleContext, x, groups: int, weight, bias) -> TensorLabels:
    g = ctx.graph
    c = x[1]
    cg = len(c) // groups
    g.couple(c[cg:], np.tile(c[:cg], groups - 1))  # same positions in every group: groups stay equal
    for t in (weight, bias):
        lab = g.labels_of(t)
        if lab is not None:
            g.couple(c, lab[0])
    return x


@channel_rule(nn.GroupNorm)
def group_norm_module(ctx, call):
    m = call.target
    return ctx.check(group_norm_labels(ctx, call.first_labels, m.num_groups, m.weight, m.bias), call.result)


@channel_rule(F.group_norm)
def group_norm_function(ctx, call):
    return ctx.check(group_norm_labels(ctx, call.arg_labels[0], call.arg(1, "num_groups"), call.arg(2, "weight"),
                                       call.arg(3, "bias")), call.result)


@channel_rule(nn.PReLU)
def prelu_module(ctx, call):
    g, x = ctx.graph, call.first_labels
    w = g.labels_of(call.target.weight)
    if len(w[0]) > 1:
        g.couple(x[1 if len(x) > 1 else 0], w[0])
    return ctx.check(x, call.result)


# ---- attention ------------------------------------------------------------------------------------------------
@channel_rule(nn.MultiheadAttention)
def multihead_attention(ctx, call):
    g, m, result = ctx.graph, call.target, call.result
    q, k, v = (call.labels(i, nm) for i, nm in enumerate(("query", "key", "value")))
    if not m._qkv_same_embed_dim or m.bias_k is not None or q is None or len(q) != 3:
        raise OpNotUnderstood("MultiheadAttention with separate q/k/v projections, bias_kv or unbatched input")
    e, h = m.embed_dim, m.num_heads
    hd = e // h
    w, wo = g.labels_of(m.in_proj_weight), g.labels_of(m.out_proj.weight)
    for other in (k, v):
        g.couple(q[-1], other[-1])
        for a, b in zip(k.dims[:-1], other.dims[:-1]):
            g.couple(a, b)
    g.couple(q[-1], w[1])
    # nn.MultiheadAttention needs its inner width equal to embed_dim: inner channel i goes with outer i,
    # and every head keeps the same positions so head_dim stays whole.
    for s in range(3):
        g.couple(w[0][s * e:(s + 1) * e], w[1])
    g.couple(wo[1], w[1])
    g.couple(wo[0], w[1])
    for j in range(1, h):
        g.couple(w[1][j * hd:(j + 1) * hd], w[1][:hd])
    if m.in_proj_bias is not None:
        bias = g.labels_of(m.in_proj_bias)
        for s in range(3):
            g.couple(bias[0][s * e:(s + 1) * e], w[1])
    if m.out_proj.bias is not None:
        g.couple(g.labels_of(m.out_proj.bias)[0], wo[0])
    g.mark_producer(wo[0])
    for nm, i in (("key_padding_mask", 4), ("attn_mask", 6)):
        mask = call.labels(i, nm)
        if mask is not None:
            ctx.pin_all(mask, "attention mask")
    out = TensorLabels(q.dims[:-1] + [wo[0]])
    weights = ctx.fixed_like(result[1]) if isinstance(result, tuple) else None
    return (ctx.check(out, result[0]), weights)
