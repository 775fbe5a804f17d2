"""Channel rules for ops that keep or combine dims without reshaping them: elementwise ops (broadcasting couples
the operands' channels), reductions, pooling and resizing, padding, rolls, matmul and attention."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .graph import SPATIAL, TensorLabels
from .rules import CHANNEL_RULES, OpNotUnderstood, RuleContext, channel_rule, flat_labels, norm_dim

_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.and_, operator.or_, operator.xor, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.pow, torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh,
    torch.relu, torch.clamp, torch.clip, torch.where, torch.maximum, torch.minimum, torch.erf, torch.sin,
    torch.cos, torch.square, torch.reciprocal, torch.lerp, torch.addcmul, torch.addcdiv, torch.masked_fill,
    torch.sign, torch.floor, torch.ceil, torch.round, torch.log1p, torch.expm1, torch.nan_to_num, torch.exp2,
    torch.sigmoid_, torch.relu_,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.softplus, F.softsign, F.hardtanh, F.logsigmoid, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.relu_, F.elu_, F.leaky_relu_,
    F.hardtanh_, F.tanhshrink, F.threshold,
}
# one tensor in, the same shape out, channels untouched (no operand to broadcast against)
_SAME_LABELS_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.cumsum, F.normalize,
                          F.gumbel_softmax, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                          torch.rand_like, torch.randn_like, torch.randint_like}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "sigmoid",
    "tanh", "relu", "clamp", "clip", "masked_fill", "square", "erf", "reciprocal", "maximum", "minimum", "where",
    "sign", "floor", "ceil", "round", "exp2", "lerp", "addcmul", "addcdiv", "__add__", "__sub__", "__mul__",
    "__truediv__", "__radd__", "__rmul__", "__rsub__", "__rtruediv__", "__neg__", "sin", "cos", "log1p", "expm1",
    "nan_to_num", "gelu", "silu", "expand_as",
}
_SAME_LABELS_METHODS = {"softmax", "log_softmax", "cumsum", "float", "half", "double", "bfloat16", "to", "type",
                        "contiguous", "clone", "detach", "cpu", "cuda", "requires_grad_", "type_as"}
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Softmax, nn.LogSoftmax,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Softmin,
)
# third-party functions that torchvision wraps for fx (so they appear as one node) and keep every dim
_SAME_LABELS_BY_NAME = ("stochastic_depth", "drop_block2d", "drop_block3d")
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3, torch.avg_pool1d: 1,
    torch.adaptive_avg_pool1d: 1,
}
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
}
_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "all", "any",
               "argmax", "argmin", "nansum", "nanmean", "median", "norm")


# ---- elementwise ----------------------------------------------------------------------------------------------
def broadcast_labels(ctx: RuleContext, operands: list, result) -> TensorLabels:
    """Labels of an elementwise result: operands' dims that line up (from the right) are the same channels."""
    g = ctx.graph
    if not isinstance(result, torch.Tensor):
        raise OpNotUnderstood("elementwise op without a tensor result")
    nd = result.dim()
    out = []
    for d in range(nd):
        size = result.shape[d]
        full = []
        for lab in operands:
            j = d - (nd - len(lab))
            if j < 0:
                continue
            arr = lab[j]
            if len(arr) == size:
                full.append(arr)
            elif len(arr) == 1:
                g.pin(arr, "broadcast against a larger dimension")
            else:
                raise OpNotUnderstood("elementwise op with shapes that do not broadcast")
        if not full:
            out.append(g.fixed_labels(size))
            continue
        for other in full[1:]:
            g.couple(full[0], other)
        out.append(full[0])
    return TensorLabels(out)


def broadcast_dims(ctx: RuleContext, dim_lists: list, out_shape: list) -> list:
    """Leading (batch) dims of several operands broadcast to ``out_shape``: full-size ones are coupled."""
    g = ctx.graph
    out = []
    nd = len(out_shape)
    for d in range(nd):
        full = []
        for dims in dim_lists:
            j = d - (nd - len(dims))
            if j < 0:
                continue
            if len(dims[j]) == out_shape[d]:
                full.append(dims[j])
            else:
                g.pin(dims[j], "broadcast against a larger dimension")
        for other in full[1:]:
            g.couple(full[0], other)
        out.append(full[0] if full else g.fixed_labels(out_shape[d]))
    return out


@channel_rule(*_ELEMENTWISE_FUNCTIONS, *_ELEMENTWISE_METHODS)
def elementwise(ctx, call):
    return broadcast_labels(ctx, list(flat_labels((call.arg_labels, call.kwarg_labels))), call.result)


CHANNEL_RULES.inplace_elementwise = elementwise


@channel_rule(*_SAME_LABELS_FUNCTIONS, *_SAME_LABELS_METHODS)
@channel_rule(*_SAME_LABELS_BY_NAME, kind="function_name")
def same_labels(ctx, call):
    return ctx.check(call.arg_labels[0], call.result)


@channel_rule(*_ELEMENTWISE_MODULES)
def elementwise_module(ctx, call):
    x = call.first_labels
    return ctx.check(x, call.result) if x is not None else ctx.fixed_like(call.result)


@channel_rule("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor")
def created_tensor(ctx, call):
    return ctx.fixed_like(call.result, "tensor created inside the model")


@channel_rule(torch._assert, torch._assert_async, "dim", "numel", "nelement", "stride", "__len__", "element_size",
              "get_device", "is_contiguous", "data_ptr")
def no_labels(ctx, call):
    return None


# ---- reductions -----------------------------------------------------------------------------------------------
@channel_rule(*_REDUCTIONS, *(getattr(torch, name) for name in _REDUCTIONS))
def reduction(ctx, call):
    g = ctx.graph
    name = call.target if isinstance(call.target, str) else call.target.__name__
    x, rest, kwargs, result = call.arg_labels[0], call.args[1:], call.kwargs, call.result
    if name in ("max", "min") and rest and isinstance(rest[0], torch.Tensor):
        return broadcast_labels(ctx, list(flat_labels(call.arg_labels)), result)  # the elementwise max / min
    if name == "norm":
        dim = kwargs.get("dim", rest[1] if len(rest) > 1 else None)
        keep = kwargs.get("keepdim", rest[2] if len(rest) > 2 else False)
    else:
        dim = kwargs.get("dim", rest[0] if rest and not isinstance(rest[0], bool) else None)
        keep = kwargs.get("keepdim", rest[1] if len(rest) > 1 and isinstance(rest[1], bool) else False)
    if dim is None:
        return ctx.fixed_like(result)
    dims = {norm_dim(int(d), len(x)) for d in ([dim] if isinstance(dim, int) else dim)}
    out = []
    for d, a in enumerate(x.dims):
        if d not in dims:
            out.append(a)
        elif keep:
            out.append(g.fixed_labels(1))
    if isinstance(result, torch.Tensor):
        return ctx.check(TensorLabels(out), result)
    return tuple(ctx.check(TensorLabels(out), r) for r in result)  # (values, indices)


# ---- pooling, resizing, padding, rolling ----------------------------------------------------------------------
def pool_labels(ctx: RuleContext, x: TensorLabels, spatial: int, result):
    """The last ``spatial`` dims are resized (pinned, new fixed positions); the channels pass through."""
    g = ctx.graph
    if not isinstance(result, torch.Tensor):  # (values, indices)
        return tuple(pool_labels(ctx, x, spatial, r) for r in result)
    for a in x.dims[len(x) - spatial:]:
        g.pin(a, SPATIAL)
    kept = x.dims[:len(x) - spatial]
    return ctx.check(TensorLabels(kept + [g.fixed_labels(s) for s in result.shape[len(x) - spatial:]]), result)


def _pool_rule(spatial: int):
    def pool(ctx, call):
        return pool_labels(ctx, call.first_labels, spatial, call.result)
    pool.__name__ = f"pool{spatial}d"
    return pool


def _register_pools():
    for op, spatial in {**_POOL_FUNCTIONS, **_POOL_MODULES}.items():
        CHANNEL_RULES.register(op, _pool_rule(spatial))


_register_pools()


@channel_rule(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, nn.Upsample,
              nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def resize(ctx, call):
    x = call.first_labels
    return pool_labels(ctx, x, len(x) - 2, call.result)


@channel_rule(F.pad)
def pad(ctx, call):
    g, x, widths = ctx.graph, call.arg_labels[0], call.arg(1, "pad")
    dims = list(x.dims)
    for i in range(len(widths) // 2):
        d = len(x) - 1 - i
        if widths[2 * i] or widths[2 * i + 1]:
            g.pin(dims[d], f"padded at {ctx.where}")
            dims[d] = g.fixed_labels(call.result.shape[d])
    return ctx.check(TensorLabels(dims), call.result)


@channel_rule("_patch_merging_pad", kind="function_name")
def pad_all_but_last(ctx, call):
    """torchvision's Swin patch merging pads H and W and keeps the channel (last) dim."""
    g, x = ctx.graph, call.arg_labels[0]
    for a in x.dims[:-1]:
        g.pin(a, f"padded at {ctx.where}")
    return TensorLabels([g.fixed_labels(s) for s in call.result.shape[:-1]] + [x[-1]])


@channel_rule(torch.roll, "roll")
def roll(ctx, call):
    x, dims = call.arg_labels[0], call.arg(2, "dims")
    if dims is None:
        dims = range(len(x))
    for d in ([dims] if isinstance(dims, int) else dims):
        ctx.graph.pin(x[norm_dim(int(d), len(x))], f"rolled at {ctx.where}")
    return ctx.check(x, call.result)


# ---- products -------------------------------------------------------------------------------------------------
@channel_rule(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm", "__matmul__")
def matmul(ctx, call):
    g, result = ctx.graph, call.result
    a, b = call.arg_labels[0], call.arg_labels[1]
    if a is None or b is None or not isinstance(result, torch.Tensor):
        raise OpNotUnderstood("matmul with a non-tensor operand")
    if len(a) >= 2 and len(b) >= 2:
        g.couple(a[-1], b[-2])
        batch = broadcast_dims(ctx, [a.dims[:-2], b.dims[:-2]], list(result.shape[:-2]))
        return ctx.check(TensorLabels(batch + [a[-2], b[-1]]), result)
    if len(a) == 1 and len(b) >= 2:
        g.couple(a[0], b[-2])
        return ctx.check(TensorLabels(b.dims[:-2] + [b[-1]]), result)
    if len(b) == 1:
        g.couple(a[-1], b[0])
        return ctx.check(TensorLabels(a.dims[:-1]), result)
    raise OpNotUnderstood("matmul of unexpected ranks")


@channel_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx, call):
    g = ctx.graph
    q, k, v = (call.labels(i, nm) for i, nm in enumerate(("query", "key", "value")))
    g.couple(q[-1], k[-1])
    g.couple(k[-2], v[-2])
    mask = call.labels(3, "attn_mask")
    if mask is not None:
        ctx.pin_all(mask, "attention mask")
    batch = broadcast_dims(ctx, [q.dims[:-2], k.dims[:-2], v.dims[:-2]], list(call.result.shape[:-2]))
    return ctx.check(TensorLabels(batch + [q[-2], v[-1]]), call.result)
