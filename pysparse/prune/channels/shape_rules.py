"""Channel rules for ops that move, merge, split or index dims: view / reshape / flatten, expand, repeat,
permute / transpose, indexing, concat / stack / split, and the sizes read from tensors (``x.shape``, ``x.size()``).

A reshape pairs runs of input dims with runs of output dims holding the same elements. A flatten of (C, H, W)
repeats each channel's class over the H*W positions it spreads to, so the consumer's input columns shrink with
the channel; a split back recovers the dim that carries the channels.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import fx, nn

from .graph import SizeOrigin, TensorLabels
from .rules import OpNotUnderstood, RuleContext, channel_rule, flat_instances, norm_dim


def _reshape_groups(a, b):
    """Pair runs of input dims with runs of output dims that hold the same elements (row-major reshape)."""
    if math.prod(a) != math.prod(b) or math.prod(a) == 0:
        return None
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= a[i]
                ins.append(i)
                i += 1
            else:
                pb *= b[j]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    if not groups:
        groups.append(([], []))
    groups[-1][0].extend(range(i, len(a)))
    groups[-1][1].extend(range(j, len(b)))
    return groups


def _merge(ctx: RuleContext, arrays):
    """Labels of several dims flattened into one: the channel dim's labels repeated over the others."""
    g = ctx.graph
    if not arrays:
        return g.fixed_labels(1)
    if len(arrays) == 1:
        return arrays[0]
    sizes = [len(a) for a in arrays]
    free = [i for i, a in enumerate(arrays) if g.free_mask(a).any()]
    if len(free) > 1:
        for i in free:
            g.pin(arrays[i], f"reshape merges two channel dimensions at {ctx.where}")
    carrier = free[0] if len(free) == 1 else int(np.argmax(sizes))
    shape = [1] * len(arrays)
    shape[carrier] = sizes[carrier]
    return np.broadcast_to(arrays[carrier].reshape(shape), sizes).reshape(-1).copy()


def _split(ctx: RuleContext, flat, sizes):
    """Labels of one dim unflattened into ``sizes``: the dim along which the labels vary carries the channels."""
    g = ctx.graph
    if len(sizes) == 1:
        return [flat]
    grid = flat.reshape(sizes)
    nd = len(sizes)
    if not g.free_mask(flat).any():
        return [g.fixed_labels(s) for s in sizes]
    for j in range(nd):
        if sizes[j] == 1 and math.prod(sizes) > 1:
            continue
        line = grid[tuple(slice(None) if i == j else 0 for i in range(nd))]
        shape = [1] * nd
        shape[j] = sizes[j]
        if np.array_equal(grid, np.broadcast_to(line.reshape(shape), sizes)):
            return [line.copy() if i == j else g.fixed_labels(s) for i, s in enumerate(sizes)]
    # No single dim carries the channels (e.g. a channel shuffle): tie each position of the last dim
    # across the others, so every slice keeps the same positions and the split stays regular.
    j = max(i for i, s in enumerate(sizes) if s > 1)
    moved = np.moveaxis(grid, j, -1).reshape(-1, sizes[j])
    g.couple(moved[1:].reshape(-1), np.tile(moved[0], len(moved) - 1))
    return [moved[0].copy() if i == j else g.fixed_labels(s) for i, s in enumerate(sizes)]


def reshape_labels(ctx: RuleContext, x: TensorLabels, result, sizes=None) -> TensorLabels:
    """Labels after a reshape to ``result``'s shape; ``sizes`` (as written in the graph, when known) pins an
    output dim whose size is a literal or read from other channels, since it could not follow a pruning."""
    g = ctx.graph
    out_shape = list(result.shape)
    groups = _reshape_groups([len(a) for a in x.dims], out_shape)
    if groups is None:
        raise OpNotUnderstood("reshape of an empty tensor")
    out = [None] * len(out_shape)
    for ins, outs in groups:
        parts = _split(ctx, _merge(ctx, [x[i] for i in ins]), [out_shape[j] for j in outs])
        for j, arr in zip(outs, parts):
            out[j] = arr
    if isinstance(sizes, fx.Node):
        origin = ctx.node_labels.get(sizes)
        sizes = list(origin) if isinstance(origin, tuple) else None
    if sizes is not None and len(sizes) == len(out_shape):
        for j, s in enumerate(sizes):
            if isinstance(s, fx.Node):
                s = ctx.node_labels.get(s)
            if isinstance(s, SizeOrigin):
                # A size read from tensor dims must shrink exactly when this dim does: same free classes.
                theirs = np.concatenate(s.arrays) if s.arrays else np.zeros(0, dtype=np.int64)
                mine_free = set(g.roots(out[j][g.free_mask(out[j])]).tolist())
                theirs_free = set(g.roots(theirs[g.free_mask(theirs)]).tolist())
                if mine_free != theirs_free:
                    reason = f"view/reshape with a size read from other channels at {ctx.where}"
                    g.pin(out[j], reason)
                    g.pin(theirs, reason)
            elif not g.free_mask(out[j]).any() or (isinstance(s, int) and s == -1):
                continue
            elif isinstance(s, int):
                g.pin(out[j], f"view/reshape with the hard-coded size {s} at {ctx.where}")
            else:
                g.pin(out[j], f"view/reshape with a size of unknown origin at {ctx.where}")
    return TensorLabels(out)


def _written_sizes(call):
    """The sizes of ``x.view(a, b)`` / ``x.view((a, b))`` as written in the graph."""
    sizes = call.node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return sizes


@channel_rule(torch.flatten, torch.squeeze, torch.unsqueeze, nn.Flatten, nn.Unflatten, "flatten", "squeeze",
              "unsqueeze", "unflatten")
def reshape_by_shape(ctx, call):
    return reshape_labels(ctx, call.first_labels, call.result)


@channel_rule(torch.reshape)
def reshape_function(ctx, call):
    return reshape_labels(ctx, call.arg_labels[0], call.result, call.literal(1))


@channel_rule("view", "reshape")
def view(ctx, call):
    sizes = _written_sizes(call)
    if len(sizes) == 1 and isinstance(call.args[1], torch.dtype):
        raise OpNotUnderstood(f"{call.target} as another dtype")
    return reshape_labels(ctx, call.arg_labels[0], call.result, sizes)


@channel_rule("view_as", "reshape_as")
def view_as(ctx, call):
    labels = reshape_labels(ctx, call.arg_labels[0], call.result)
    for a, b in zip(labels.dims, call.arg_labels[1].dims):
        ctx.graph.couple(a, b)
    return labels


@channel_rule("expand")
def expand(ctx, call):
    g, x, result = ctx.graph, call.arg_labels[0], call.result
    sizes = _written_sizes(call)
    out_shape = list(result.shape)
    lead = len(out_shape) - len(x)
    out = [g.fixed_labels(s) for s in out_shape[:lead]]
    for i, a in enumerate(x.dims):
        size = out_shape[lead + i]
        lit = sizes[lead + i] if len(sizes) == len(out_shape) else None
        if len(a) == size:
            if isinstance(lit, int) and lit != -1:
                g.pin(a, f"expand with the hard-coded size {lit} at {ctx.where}")
            out.append(a)
        else:
            g.pin(a, "broadcast against a larger dimension")
            out.append(g.fixed_labels(size))
    return TensorLabels(out)


@channel_rule("repeat")
def repeat(ctx, call):
    g, x = ctx.graph, call.arg_labels[0]
    out_shape = list(call.result.shape)
    lead = len(out_shape) - len(x)
    out = [g.fixed_labels(s) for s in out_shape[:lead]]
    for i, a in enumerate(x.dims):
        if len(a) == out_shape[lead + i]:
            out.append(a)
        else:
            g.pin(a, f"repeat at {ctx.where}")
            out.append(g.fixed_labels(out_shape[lead + i]))
    return TensorLabels(out)


# ---- reordering dims ------------------------------------------------------------------------------------------
@channel_rule(torch.permute, "permute")
def permute(ctx, call):
    x, args = call.arg_labels[0], call.args
    if isinstance(call.target, str):  # x.permute(0, 2, 1) or x.permute((0, 2, 1))
        dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
    else:
        dims = call.arg(1, "dims")
    dims = [norm_dim(int(d), len(x)) for d in dims]
    return ctx.check(TensorLabels([x[d] for d in dims]), call.result)


def _swap(ctx, x, d0, d1, result):
    dims = list(x.dims)
    d0, d1 = norm_dim(int(d0), len(x)), norm_dim(int(d1), len(x))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return ctx.check(TensorLabels(dims), result)


@channel_rule(torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims")
def transpose(ctx, call):
    return _swap(ctx, call.arg_labels[0], call.args[1], call.args[2], call.result)


@channel_rule(torch.t, "t")
def matrix_transpose(ctx, call):
    return _swap(ctx, call.arg_labels[0], 0, -1, call.result)


# ---- attributes, sizes and indexing ---------------------------------------------------------------------------
@channel_rule(getattr)
def tensor_attribute(ctx, call):
    x, attr, result = call.arg_labels[0], call.args[1], call.result
    if attr == "shape" and isinstance(x, TensorLabels):
        return tuple(SizeOrigin([a]) for a in x.dims)
    if not isinstance(result, torch.Tensor):
        return None
    if attr == "T":
        return ctx.check(TensorLabels(list(reversed(x.dims))), result)
    if attr == "mT":
        return _swap(ctx, x, -2, -1, result)
    if attr == "data":
        return ctx.check(x, result)
    raise OpNotUnderstood(f"tensor attribute {attr}")


@channel_rule("size")
def size(ctx, call):
    x = call.arg_labels[0]
    if x is None:
        return None
    d = call.arg(1, "dim")
    return tuple(SizeOrigin([a]) for a in x.dims) if d is None else SizeOrigin([x[norm_dim(int(d), len(x))]])


def size_arithmetic(ctx, call):
    """A call without tensor arguments: sizes combined into new sizes, or a tensor created inside the model."""
    if isinstance(call.result, torch.Tensor):
        return ctx.fixed_like(call.result, "tensor created inside the model")
    la = call.arg_labels
    if call.target is operator.getitem and isinstance(la[0], tuple) and isinstance(call.args[1], int):
        return la[0][call.args[1]]
    arrays = [a for sz in flat_instances((la, call.kwarg_labels), SizeOrigin) for a in sz.arrays]
    return SizeOrigin(arrays) if arrays and isinstance(call.result, int) else None


@channel_rule(operator.getitem)
def getitem(ctx, call):
    """``x[...]`` (basic indexing) or an element of a tuple of labels (a split's pieces, a shape)."""
    g = ctx.graph
    src, idx = call.args[0], call.args[1]
    x, result = call.arg_labels[0], call.result
    if not isinstance(src, torch.Tensor):
        if isinstance(x, (tuple, list)) and isinstance(idx, (int, slice)):
            return x[idx]
        return ctx.fixed_like(result)
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(e, (torch.Tensor, list, bool)) for e in idx):
        raise OpNotUnderstood("advanced (tensor) indexing")
    consumed = sum(1 for e in idx if e is not None and e is not Ellipsis)
    out, d = [], 0
    for e in idx:
        if e is None:
            out.append(None)
        elif e is Ellipsis:
            for _ in range(len(x) - consumed):
                out.append(x[d])
                d += 1
        elif isinstance(e, int):
            g.pin(x[d], f"indexed by position at {ctx.where}")
            d += 1
        elif isinstance(e, slice):
            if e == slice(None):
                out.append(x[d])
            else:
                g.pin(x[d], f"sliced by position at {ctx.where}")
                out.append(False)
            d += 1
        else:
            raise OpNotUnderstood(f"index of type {type(e).__name__}")
    out.extend(x.dims[d:])
    if len(out) != result.dim():
        raise OpNotUnderstood("indexing bookkeeping mismatch")
    dims = [a if isinstance(a, np.ndarray) else g.fixed_labels(result.shape[i]) for i, a in enumerate(out)]
    return ctx.check(TensorLabels(dims), result)


# ---- joining and splitting ------------------------------------------------------------------------------------
@channel_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx, call):
    g, result = ctx.graph, call.result
    nd = result.dim()
    dim = norm_dim(int(call.arg(1, "dim", 0)), nd)
    # torch.cat skips 1-D empty tensors (an old idiom for "nothing yet")
    labels = [lab for t, lab in zip(call.args[0], call.arg_labels[0])
              if not (isinstance(t, torch.Tensor) and t.numel() == 0 and t.dim() == 1)]
    out = []
    for d in range(nd):
        if d == dim:
            out.append(np.concatenate([lab[d] for lab in labels]))
        else:
            for lab in labels[1:]:
                g.couple(labels[0][d], lab[d])
            out.append(labels[0][d])
    return ctx.check(TensorLabels(out), result)


@channel_rule(torch.stack)
def stack(ctx, call):
    g, labels, result = ctx.graph, call.arg_labels[0], call.result
    dim = norm_dim(int(call.arg(1, "dim", 0)), result.dim())
    for lab in labels[1:]:
        for a, b in zip(labels[0].dims, lab.dims):
            g.couple(a, b)
    dims = list(labels[0].dims)
    dims.insert(dim, g.fixed_labels(len(labels)))
    return ctx.check(TensorLabels(dims), result)


@channel_rule(torch.chunk, torch.split, torch.tensor_split, torch.unbind, "chunk", "split", "tensor_split",
              "unbind")
def split(ctx, call):
    g, x, result = ctx.graph, call.arg_labels[0], call.result
    name = call.target if isinstance(call.target, str) else call.target.__name__
    if name == "unbind":
        dim = norm_dim(int(call.arg(1, "dim", 0)), len(x))
        g.pin(x[dim], f"unbind at {ctx.where}")
        return tuple(TensorLabels(x.dims[:dim] + x.dims[dim + 1:]) for _ in result)
    dim = norm_dim(int(call.arg(2, "dim", 0)), len(x))
    sizes = [r.shape[dim] for r in result]
    arr = x[dim]
    if len(result) > 1:
        if name == "chunk" and len(set(sizes)) == 1:
            s = sizes[0]  # chunk() splits by count: tie the chunks' positions so they stay equal
            for k in range(1, len(result)):
                g.couple(arr[k * s:(k + 1) * s], arr[:s])
        else:
            g.pin(arr, f"{name} with fixed sizes at {ctx.where}")
    out, start = [], 0
    for s in sizes:
        out.append(TensorLabels(x.dims[:dim] + [arr[start:start + s]] + x.dims[dim + 1:]))
        start += s
    return tuple(out)
