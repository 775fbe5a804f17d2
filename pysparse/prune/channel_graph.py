"""Channel dependency graph: which channel dimensions of a model must shrink together.

The model is traced with torch.fx and run on the example inputs by an interpreter that gives every index of
every tensor dimension a label, its *channel class*. Ops couple classes: a residual add unites the channels it
adds, a convolution ties its weight's input dim to its input's channel dim, a concat lays its inputs' classes
side by side, a flatten repeats each channel's class over the positions it spreads to. A class is removed whole:
every parameter slice attached to it goes, and every tensor dimension carrying it shrinks, so whatever survives
is consistent by construction. Dimensions that must keep their size (the model's inputs and outputs, batch and
spatial dims, anything touched by an op this module does not understand) are *pinned*, and the first reason
is kept for the report. Classes linked through any coupling form a *family* (Torch-Pruning's "group"): the
unit that is ranked, rounded and, if pruning it breaks the model, rolled back. Only classes that some weight
computes (a conv/linear output row) are removable: a class made only of, say, a kernel's spatial positions
never is.

Labels are int64 numpy arrays, one per tensor dim. Non-negative ids are classes (union-find); negative ids are
fixed positions, each negative id naming why (``-1`` = batch or spatial dimension).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelGraph", "TraceFailure", "build_channel_graph"]

_SPATIAL = "batch or spatial dimension"


class TraceFailure(RuntimeError):
    """The model could not be traced at all (reported; the model is left as it is)."""


class _T:
    """Labels of one tensor: one int64 array per dimension (its length is the dimension's size)."""

    __slots__ = ("dims",)

    def __init__(self, dims):
        self.dims = list(dims)

    def __len__(self):
        return len(self.dims)

    def __getitem__(self, i):
        return self.dims[i]


class _S:
    """Provenance of a Python int computed from tensor sizes: the labels of every dim it was computed from."""

    __slots__ = ("arrays",)

    def __init__(self, arrays):
        self.arrays = list(arrays)


@dataclass
class ParamInfo:
    """A parameter or buffer seen by the trace, with its labels per dim and every (module, name) that holds it."""

    name: str                       # canonical qualified name
    tensor: torch.Tensor
    labels: list                    # one class-id array per dim
    holders: list = field(default_factory=list)  # [(module_qualname, attr_name)]
    is_param: bool = True


class ChannelGraph:
    """Union-find over channel classes plus everything the surgery needs: param labels, conv modes, notes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._n = 0
        self._parent = np.zeros(1024, dtype=np.int64)   # class union-find (numpy: vectorised finds)
        self._fparent = np.zeros(1024, dtype=np.int64)  # family union-find over the same ids
        self.reason: list[str | None] = []     # at roots: why the class is pinned (None = free)
        self.producer_dims: dict[int, np.ndarray] = {}  # id(labels) -> labels of a weight dim that makes channels
        self.fixed_reasons: list[str] = []
        self._fixed_ids: dict[str, int] = {}
        self.params: dict[int, ParamInfo] = {}  # id(tensor) -> info, created on first use
        self.conv_modes: dict[int, str] = {}    # id(weight) -> "dense" | "depthwise" | "grouped"
        self.notes: list[str] = []              # ops handled conservatively (pinned), trace fallbacks
        self._tensor_names = {}
        for qual, mod in model.named_modules(remove_duplicate=False):
            for pname, p in list(mod._parameters.items()) + list(mod._buffers.items()):
                if p is None:
                    continue
                full = f"{qual}.{pname}" if qual else pname
                is_param = pname in mod._parameters
                entry = self._tensor_names.setdefault(id(p), [full, is_param, []])
                entry[2].append((qual, pname))
        self.SPATIAL = self.fixed(_SPATIAL)

    # ---- classes --------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self._n

    def new(self, n: int) -> np.ndarray:
        start = self._n
        while start + n > len(self._parent):
            self._parent = np.concatenate([self._parent, np.zeros_like(self._parent)])
            self._fparent = np.concatenate([self._fparent, np.zeros_like(self._fparent)])
        ids = np.arange(start, start + n, dtype=np.int64)
        self._parent[start:start + n] = ids
        self._fparent[start:start + n] = start  # classes made together (one param dim) start as one family
        self._n += n
        self.reason.extend([None] * n)
        return ids

    def fixed(self, reason: str) -> int:
        if reason not in self._fixed_ids:
            self.fixed_reasons.append(reason)
            self._fixed_ids[reason] = -len(self.fixed_reasons)
        return self._fixed_ids[reason]

    def fixed_array(self, n: int, reason: str | None = None) -> np.ndarray:
        return np.full(int(n), self.SPATIAL if reason is None else self.fixed(reason), dtype=np.int64)

    @staticmethod
    def _vfind(parent: np.ndarray, arr: np.ndarray) -> np.ndarray:
        out = np.asarray(arr, dtype=np.int64).copy()
        pos = out >= 0
        start = out[pos]
        idx = start
        while True:
            nxt = parent[idx]
            if np.array_equal(nxt, idx):
                break
            idx = nxt
        parent[start] = idx  # path compression for the queried ids
        out[pos] = idx
        return out

    def roots(self, arr: np.ndarray) -> np.ndarray:
        """Root class of every id (negative fixed ids stay as they are)."""
        return self._vfind(self._parent, arr)

    def find(self, c: int) -> int:
        c = int(c)
        if c < 0:
            return c
        parent = self._parent
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = int(parent[c])
        return c

    def ffind(self, c: int) -> int:
        c = int(c)
        fp = self._fparent
        while fp[c] != c:
            fp[c] = fp[fp[c]]
            c = int(fp[c])
        return c

    def pinned(self, c: int) -> bool:
        return c < 0 or self.reason[self.find(c)] is not None

    def why(self, c: int) -> str | None:
        if c < 0:
            return self.fixed_reasons[-1 - c]
        return self.reason[self.find(c)]

    def _union_roots(self, ra: int, rb: int) -> None:
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self.reason[ra] = self.reason[ra] or self.reason[rb]
        fa, fb = self.ffind(ra), self.ffind(rb)
        if fa != fb:
            self._fparent[max(fa, fb)] = min(fa, fb)

    def union(self, a: int, b: int) -> None:
        self.union_arrays(np.array([a], dtype=np.int64), np.array([b], dtype=np.int64))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise ValueError(f"cannot couple dimensions of sizes {len(a)} and {len(b)}")
        ra, rb = self.roots(a), self.roots(b)
        diff = ra != rb
        if not diff.any():
            return
        x, y = ra[diff], rb[diff]
        fixed = (x < 0) | (y < 0)
        for u, v in zip(x[fixed].tolist(), y[fixed].tolist()):
            if u >= 0 or v >= 0:
                c, f = (u, v) if u >= 0 else (v, u)
                c = self.find(c)
                if self.reason[c] is None:
                    self.reason[c] = self.fixed_reasons[-1 - f]
        x, y = x[~fixed], y[~fixed]
        lo, hi = np.minimum(x, y), np.maximum(x, y)
        if len(np.unique(hi)) == len(hi) and not np.isin(hi, lo).any():
            # A matching between distinct roots (the common case: one dim's channels onto another's): link
            # all at once, then merge the (few, distinct) family pairs and carry pin reasons over.
            self._parent[hi] = lo
            for h, l in zip(hi.tolist(), lo.tolist()):
                if self.reason[h] is not None and self.reason[l] is None:
                    self.reason[l] = self.reason[h]
            fl, fh = self._vfind(self._fparent, lo), self._vfind(self._fparent, hi)
            for u, v in set(zip(fl.tolist(), fh.tolist())):
                u, v = self.ffind(u), self.ffind(v)
                if u != v:
                    self._fparent[max(u, v)] = min(u, v)
            return
        for u, v in zip(x.tolist(), y.tolist()):
            self._union_roots(self.find(u), self.find(v))

    def pin(self, arr: np.ndarray, reason: str) -> None:
        for c in np.unique(self.roots(arr)).tolist():
            if c >= 0 and self.reason[c] is None:
                self.reason[c] = reason

    def produce(self, arr: np.ndarray) -> None:
        """Mark a weight dim whose entries compute channels (conv/linear output rows): only such classes prune."""
        self.producer_dims[id(arr)] = arr

    def free_mask(self, arr: np.ndarray) -> np.ndarray:
        r = self.roots(arr)
        out = np.zeros(len(r), dtype=bool)
        for c in np.unique(r[r >= 0]).tolist():
            if self.reason[c] is None:
                out[r == c] = True
        return out

    # ---- parameters -----------------------------------------------------------------------------------------
    def param(self, t: torch.Tensor | None):
        """Labels of a parameter/buffer (fresh classes per dim on first use, shared by every use after)."""
        if t is None:
            return None
        info = self.params.get(id(t))
        if info is None:
            name, is_param, holders = self._tensor_names.get(id(t), (None, True, []))
            if name is None:
                return _T(self.fixed_array(s, "tensor that is not a model parameter or buffer") for s in t.shape)
            info = ParamInfo(name, t, [self.new(s) for s in t.shape], list(holders), is_param)
            self.params[id(t)] = info
        return _T(info.labels)

    def tensor_name(self, t: torch.Tensor) -> str | None:
        entry = self._tensor_names.get(id(t))
        return entry[0] if entry else None


# ---- tracing --------------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """fx tracer that records the module path of every node and can keep chosen submodules opaque."""

    def __init__(self, extra_leaves=()):
        super().__init__()
        self.extra_leaves = set(extra_leaves)
        self.stack = [""]
        self.failed_at: str | None = None

    def is_leaf_module(self, m, qualname):
        return qualname in self.extra_leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qual = self.path_of_module(m)
        self.stack.append(qual)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None and not self.is_leaf_module(m, qual):
                self.failed_at = qual
            raise
        finally:
            self.stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["pysparse_module"] = self.stack[-1]
        return node


def _trace(model: nn.Module, notes: list[str], max_retries: int = 30) -> fx.GraphModule:
    """Symbolic trace; a submodule that cannot be traced becomes an opaque leaf (its channels stay)."""
    leaves: set[str] = set()
    for _ in range(max_retries):
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any trace error: fall back to a leaf, or give up
            where = tracer.failed_at
            if not where or where in leaves:
                raise TraceFailure(f"torch.fx could not trace the model: {type(exc).__name__}: {exc}") from exc
            leaves.add(where)
            notes.append(f"{where}: not traceable by torch.fx ({type(exc).__name__}: {str(exc)[:120]}); "
                         "kept as an opaque block, its channels are not pruned")
            continue
        return fx.GraphModule(tracer.root, graph)
    raise TraceFailure(f"torch.fx could not trace the model after making {len(leaves)} submodules opaque")


# ---- op tables ------------------------------------------------------------------------------------------------
_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.and_, operator.or_, operator.xor, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.pow, torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh,
    torch.relu, torch.clamp, torch.clip, torch.where, torch.maximum, torch.minimum, torch.erf, torch.sin,
    torch.cos, torch.square, torch.reciprocal, torch.lerp, torch.addcmul, torch.addcdiv, torch.masked_fill,
    torch.sign, torch.floor, torch.ceil, torch.round, torch.log1p, torch.expm1, torch.softmax, torch.log_softmax,
    torch.cumsum, torch.nan_to_num, torch.exp2, torch.sigmoid_, torch.relu_,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.softplus, F.softsign, F.hardtanh, F.logsigmoid, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.softmax, F.log_softmax, F.normalize,
    F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_, F.tanhshrink, F.threshold, F.gumbel_softmax,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "sigmoid",
    "tanh", "relu", "clamp", "clip", "masked_fill", "softmax", "log_softmax", "float", "half", "double",
    "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach", "cpu", "cuda", "square", "erf",
    "reciprocal", "maximum", "minimum", "where", "sign", "floor", "ceil", "round", "cumsum", "exp2", "lerp",
    "addcmul", "addcdiv", "__add__", "__sub__", "__mul__", "__truediv__", "__radd__", "__rmul__", "__rsub__",
    "__rtruediv__", "__neg__", "requires_grad_", "sin", "cos", "log1p", "expm1", "nan_to_num", "gelu", "silu",
}
# third-party functions that torchvision wraps for fx (so they appear as one node): how they treat channels
_SHAPE_PRESERVING_BY_NAME = {"stochastic_depth", "drop_block2d", "drop_block3d"}
_LAST_DIM_KEPT_BY_NAME = {"_patch_merging_pad"}  # pads H and W, keeps the channel (last) dim
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Softmax, nn.LogSoftmax,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Softmin,
)
_POOL_FUNCS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3, torch.avg_pool1d: 1,
    torch.adaptive_avg_pool1d: 1,
}
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "all", "any",
               "argmax", "argmin", "nansum", "nanmean", "median", "norm"}
_SIZE_METHODS = {"size", "dim", "numel", "nelement", "stride", "__len__", "element_size", "get_device",
                 "is_contiguous", "data_ptr"}
_CREATION = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn,
             torch.randint, torch.linspace, torch.eye, torch.tensor, torch.as_tensor, torch.logspace}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
         torch.randn_like, torch.randint_like}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.mm}


def _fn_name(target) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def _arg(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


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


# ---- the interpreter ------------------------------------------------------------------------------------------
class _LabelInterpreter(fx.Interpreter):
    """Runs the traced graph on real inputs and computes, node by node, the labels of every output."""

    def __init__(self, gm: fx.GraphModule, g: ChannelGraph, mode: str):
        super().__init__(gm, garbage_collect_values=True)
        self.g = g
        self.mode = mode  # "eval" or "train": which traced graph this is
        self.labels: dict[fx.Node, object] = {}

    def run_node(self, n):
        la = fx.node.map_arg(n.args, lambda a: self.labels.get(a))
        lk = fx.node.map_arg(n.kwargs, lambda a: self.labels.get(a))
        self.where = f"{n.meta.get('pysparse_module') or 'model'} ({n.name})"
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            failed = _has_failed((args, kwargs))
            if not failed:
                try:
                    result = getattr(self, n.op)(n.target, args, kwargs)
                except Exception as exc:  # noqa: BLE001 - e.g. an auxiliary head too small for this input
                    if n.op in ("placeholder", "output"):
                        raise
                    failed = f"{type(exc).__name__}: {str(exc)[:100]}"
        if failed:
            # This graph cannot run at the example size past here: keep what feeds the rest of it.
            reason = f"feeds {self.where}, which does not run on the example inputs in {self.mode} mode"
            if failed is not True:
                self.g.notes.append(f"{self.where}: does not run on the example inputs in {self.mode} mode "
                                    f"({failed}); channels feeding it are kept")
            self.pin_all(la, reason)
            self.pin_all(lk, reason)
            self.labels[n] = None
            return _FAILED
        try:
            labels = self.rule(n, args, kwargs, la, lk, result)
        except _Opaque as why:
            labels = self.opaque(la, lk, result, str(why))
        except Exception as exc:  # noqa: BLE001 - a rule that trips: keep everything it touches (always safe)
            labels = self.opaque(la, lk, result, f"could not analyse {_fn_name(n.target)} "
                                                 f"({type(exc).__name__}: {exc})")
        self.labels[n] = labels
        return result

    # -- helpers --------------------------------------------------------------------------------------------
    def fixed_like(self, value, reason=None):
        if isinstance(value, torch.Tensor):
            return _T(self.g.fixed_array(s, reason) for s in value.shape)
        if isinstance(value, (tuple, list)):
            return tuple(self.fixed_like(v, reason) for v in value)
        return None

    def pin_all(self, labels, reason):
        if isinstance(labels, _T):
            for a in labels.dims:
                self.g.pin(a, reason)
        elif isinstance(labels, (tuple, list)):
            for x in labels:
                self.pin_all(x, reason)
        elif isinstance(labels, dict):
            for x in labels.values():
                self.pin_all(x, reason)

    def opaque(self, la, lk, result, why):
        reason = f"{why} at {self.where}"
        if _has_labels(la) or _has_labels(lk):
            self.g.notes.append(f"{self.where}: {why}: channels through it are kept")
        self.pin_all(la, reason)
        self.pin_all(lk, reason)
        return self.fixed_like(result, reason)

    def check(self, labels: _T, value):
        if not isinstance(value, torch.Tensor) or [len(a) for a in labels.dims] != list(value.shape):
            raise _Opaque("shape bookkeeping mismatch")
        return labels

    # -- dispatch -------------------------------------------------------------------------------------------
    def rule(self, n, args, kwargs, la, lk, result):
        g = self.g
        if n.op == "placeholder":
            return self.fixed_like(result, "model input")
        if n.op == "output":
            self.pin_all(la, "model output")
            return None
        if n.op == "get_attr":
            if isinstance(result, torch.Tensor):
                return g.param(result)
            return None
        if n.op == "call_module":
            return self.module_rule(self.module.get_submodule(n.target), n, args, kwargs, la, lk, result)
        target = n.target
        if n.op == "call_method":
            return self.method_rule(target, n, args, kwargs, la, lk, result)
        return self.function_rule(target, n, args, kwargs, la, lk, result)

    def module_rule(self, m, n, args, kwargs, la, lk, result):
        g = self.g
        x = _first_labels(la, lk)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return self.check(x, result) if x is not None else self.fixed_like(result)
        if isinstance(m, nn.PReLU):
            w = g.param(m.weight)
            if len(w[0]) > 1:
                g.union_arrays(x[1 if len(x) > 1 else 0], w[0])
            return self.check(x, result)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.check(self.conv(x, g.param(m.weight), g.param(m.bias), m.groups, result, m.weight), result)
        if isinstance(m, nn.Linear):
            return self.check(self.linear(x, g.param(m.weight), g.param(m.bias)), result)
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if m.weight is None and m.running_mean is None:
                raise _Opaque(f"{type(m).__name__} without parameters or statistics (num_features cannot follow)")
            return self.check(self.batch_norm(x, [m.weight, m.bias, m.running_mean, m.running_var]), result)
        if isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm" and hasattr(m, "normalized_shape"):
            return self.check(self.layer_norm(x, len(m.normalized_shape), m.weight, getattr(m, "bias", None)),
                              result)
        if isinstance(m, nn.GroupNorm):
            return self.check(self.group_norm(x, m.num_groups, m.weight, m.bias), result)
        if isinstance(m, nn.MultiheadAttention):
            return self.mha(m, args, kwargs, la, lk, result)
        if isinstance(m, _POOL_MODULES):
            nsp = 3 if "3d" in type(m).__name__ else 1 if "1d" in type(m).__name__ else 2
            return self.pool(x, nsp, result)
        if isinstance(m, nn.Flatten):
            return self.reshape(x, result)
        if isinstance(m, nn.Unflatten):
            return self.reshape(x, result)
        raise _Opaque(f"module {type(m).__name__} is not understood")

    def function_rule(self, f, n, args, kwargs, la, lk, result):
        g = self.g
        name = getattr(f, "__name__", "")
        if not _has_tensor(args) and not _has_tensor(kwargs):
            if isinstance(result, torch.Tensor) or f in _CREATION:
                return self.fixed_like(result, "tensor created inside the model")
            if f is operator.getitem and isinstance(la[0], tuple) and isinstance(args[1], int):
                return la[0][args[1]]
            arrays = [a for sz in _flat_sizes((la, lk)) for a in sz.arrays]
            return _S(arrays) if arrays and isinstance(result, int) else None
        if f in _ELEMENTWISE_FUNCS or name in _SHAPE_PRESERVING_BY_NAME:
            if f in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.cumsum, F.normalize,
                     F.gumbel_softmax) or name in _SHAPE_PRESERVING_BY_NAME:
                return self.check(la[0], result)
            return self.broadcast(args, kwargs, la, lk, result)
        if name in _LAST_DIM_KEPT_BY_NAME:
            x = la[0]
            for a in x.dims[:-1]:
                g.pin(a, f"padded by {name}")
            return _T([g.fixed_array(s) for s in result.shape[:-1]] + [x[-1]])
        if f is getattr:
            return self.getattr_rule(la[0], args[1], result)
        if f is operator.getitem:
            return self.getitem(args, la, result)
        if f in _MATMUL:
            return self.matmul(la[0], la[1], result)
        if f is F.scaled_dot_product_attention:
            return self.sdpa(args, kwargs, la, lk, result)
        if f in _POOL_FUNCS:
            return self.pool(la[0], _POOL_FUNCS[f], result)
        if f in (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear):
            return self.pool(la[0], la[0].__len__() - 2, result)
        if f is F.linear:
            return self.check(self.linear(la[0], _arg(la, lk, 1, "weight"), _arg(la, lk, 2, "bias")), result)
        if f in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
            w = _arg(args, kwargs, 1, "weight")
            groups = _arg(args, kwargs, 6, "groups", 1)
            return self.check(self.conv(la[0], _arg(la, lk, 1, "weight"), _arg(la, lk, 2, "bias"), groups,
                                        result, w), result)
        if f is F.batch_norm:
            tensors = [_arg(la, lk, i, k) for i, k in ((3, "weight"), (4, "bias"), (1, "running_mean"),
                                                       (2, "running_var"))]
            return self.check(self.batch_norm(la[0], tensors, labels_given=True), result)
        if f is F.layer_norm:
            shape = _arg(args, kwargs, 1, "normalized_shape")
            wt = _arg(args, kwargs, 2, "weight")
            owner = self.owner_of(wt)
            if owner is None or not isinstance(owner, nn.LayerNorm):
                raise _Opaque("layer_norm whose normalized_shape is not held by an nn.LayerNorm")
            return self.check(self.layer_norm(la[0], len(shape), wt, _arg(args, kwargs, 3, "bias")), result)
        if f is F.group_norm:
            return self.check(self.group_norm(la[0], _arg(args, kwargs, 1, "num_groups"),
                                              _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")),
                              result)
        if f in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze):
            sizes = n.args[1] if f is torch.reshape and len(n.args) > 1 else None
            return self.reshape(la[0], result, sizes)
        if f in (torch.permute,):
            return self.permute(la[0], _arg(args, kwargs, 1, "dims"), result)
        if f in (torch.transpose, torch.swapaxes, torch.swapdims):
            return self.transpose(la[0], args[1], args[2], result)
        if f is torch.t:
            return self.transpose(la[0], 0, -1, result)
        if f is torch.cat or f is torch.concat or f is torch.concatenate:
            return self.cat(args[0], la[0], _arg(args, kwargs, 1, "dim", 0), result)
        if f is torch.stack:
            return self.stack(la[0], _arg(args, kwargs, 1, "dim", 0), result)
        if f in (torch.chunk, torch.split, torch.tensor_split, torch.unbind):
            return self.split(name, la[0], args, kwargs, result)
        if f in _LIKE:
            return self.check(la[0], result)
        if f is torch.roll:
            return self.roll(la[0], _arg(args, kwargs, 2, "dims"), result)
        if f is F.pad:
            return self.pad(la[0], _arg(args, kwargs, 1, "pad"), result)
        if name in _REDUCTIONS and getattr(torch, name, None) is f:
            return self.reduce(name, la[0], args[1:], kwargs, result, la)
        if f is torch._assert or f is torch._assert_async:
            return None
        raise _Opaque(f"function {_fn_name(f)} is not understood")

    def method_rule(self, name, n, args, kwargs, la, lk, result):
        g = self.g
        x = la[0]
        if name == "size" and isinstance(x, _T):
            d = _arg(args, kwargs, 1, "dim")
            return tuple(_S([a]) for a in x.dims) if d is None else _S([x[_norm_dim(int(d), len(x))]])
        if name in _SIZE_METHODS:
            return None
        if not isinstance(args[0], torch.Tensor):
            raise _Opaque(f"method {name} on a {type(args[0]).__name__}")
        if name in ("softmax", "log_softmax", "cumsum", "float", "half", "double", "bfloat16", "to", "type",
                    "contiguous", "clone", "detach", "cpu", "cuda", "requires_grad_", "type_as"):
            return self.check(x, result)
        if name in _ELEMENTWISE_METHODS or (name.endswith("_") and not name.startswith("_")
                                             and name not in ("resize_", "set_", "transpose_", "t_", "squeeze_",
                                                              "unsqueeze_", "as_strided_", "index_add_",
                                                              "scatter_", "scatter_add_", "index_copy_",
                                                              "index_fill_", "put_", "masked_scatter_",
                                                              "copy_")):
            return self.broadcast(args, kwargs, la, lk, result)  # in place too: self is one of the operands
        if name in ("view", "reshape"):
            sizes = n.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            if len(sizes) == 1 and isinstance(args[1], torch.dtype):
                raise _Opaque(f"{name} as another dtype")
            return self.reshape(x, result, sizes)
        if name in ("flatten", "squeeze", "unsqueeze"):
            return self.reshape(x, result)
        if name == "unflatten":
            return self.reshape(x, result)
        if name in ("view_as", "reshape_as"):
            labels = self.reshape(x, result)
            other = la[1]
            for a, b in zip(labels.dims, other.dims):
                g.union_arrays(a, b)
            return labels
        if name == "expand_as":
            return self.broadcast(args, kwargs, la, lk, result)
        if name == "expand":
            sizes = n.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            return self.expand(x, result, sizes)
        if name == "repeat":
            return self.repeat(x, result)
        if name == "permute":
            dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
            return self.permute(x, dims, result)
        if name in ("transpose", "swapaxes", "swapdims"):
            return self.transpose(x, args[1], args[2], result)
        if name == "t":
            return self.transpose(x, 0, -1, result)
        if name in ("chunk", "split", "tensor_split", "unbind"):
            return self.split(name, x, args, kwargs, result)
        if name in _REDUCTIONS:
            return self.reduce(name, x, args[1:], kwargs, result, la)
        if name in ("matmul", "bmm", "mm", "__matmul__"):
            return self.matmul(x, la[1], result)
        if name == "roll":
            return self.roll(x, _arg(args, kwargs, 2, "dims"), result)
        if name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
            return self.fixed_like(result, "tensor created inside the model")
        if name == "masked_fill":
            return self.broadcast(args, kwargs, la, lk, result)
        raise _Opaque(f"method {name} is not understood")

    # -- layer rules ------------------------------------------------------------------------------------------
    def conv(self, x, w, b, groups, result, weight_tensor):
        g = self.g
        nsp = len(w) - 2
        cdim = len(x) - nsp - 1
        if cdim not in (0, 1):
            raise _Opaque("convolution input of unexpected rank")
        xc, c_in, c_out = x[cdim], len(x[cdim]), len(w[0])
        if groups == 1:
            g.union_arrays(xc, w[1])
            mode = "dense"
        elif c_in // groups == 1:
            # Every group reads one input channel: removing an input channel removes its whole group.
            g.union_arrays(np.repeat(xc, c_out // groups), w[0])
            g.pin(w[1], "input dim of a depthwise kernel (one channel per group)")
            mode = "depthwise"
        else:
            # Grouped: keep the group count and remove the same positions in every group.
            cout_g = c_out // groups
            g.union_arrays(xc, np.tile(w[1], groups))
            g.union_arrays(w[0][cout_g:], np.tile(w[0][:cout_g], groups - 1))
            mode = "grouped"
        if b is not None:
            g.union_arrays(w[0], b[0])
        g.produce(w[0])
        for a in x.dims[cdim + 1:]:
            g.pin(a, _SPATIAL)
        for a in w.dims[2:]:
            g.pin(a, "kernel spatial dim")
        if g.conv_modes.setdefault(id(weight_tensor), mode) != mode:
            raise _Opaque("convolution weight used with different group structures")
        spatial = [g.fixed_array(s) for s in result.shape[cdim + 1:]]
        return _T(x.dims[:cdim] + [w[0]] + spatial)

    def linear(self, x, w, b):
        g = self.g
        g.union_arrays(x[-1], w[1])
        if b is not None:
            g.union_arrays(w[0], b[0])
        g.produce(w[0])
        return _T(x.dims[:-1] + [w[0]])

    def batch_norm(self, x, tensors, labels_given=False):
        g = self.g
        cdim = 1 if len(x) > 1 else 0
        for t in tensors:
            lab = t if labels_given else g.param(t)
            if lab is not None:
                g.union_arrays(x[cdim], lab[0])
        return x

    def layer_norm(self, x, nd, weight, bias):
        g = self.g
        if weight is None:
            for a in x.dims[-nd:]:
                g.pin(a, "LayerNorm without affine parameters (its normalized_shape cannot follow)")
            return x
        for t in (weight, bias):
            lab = g.param(t)
            if lab is not None:
                for a, b in zip(x.dims[-nd:], lab.dims):
                    g.union_arrays(a, b)
        return x

    def group_norm(self, x, groups, weight, bias):
        g = self.g
        c = x[1]
        cg = len(c) // groups
        g.union_arrays(c[cg:], np.tile(c[:cg], groups - 1))  # same positions in every group: groups stay equal
        for t in (weight, bias):
            lab = g.param(t)
            if lab is not None:
                g.union_arrays(c, lab[0])
        return x

    def mha(self, m, args, kwargs, la, lk, result):
        g = self.g
        q, k, v = (_arg(la, lk, i, nm) for i, nm in enumerate(("query", "key", "value")))
        if not m._qkv_same_embed_dim or m.bias_k is not None or q is None or len(q) != 3:
            raise _Opaque("MultiheadAttention with separate q/k/v projections, bias_kv or unbatched input")
        e, h = m.embed_dim, m.num_heads
        hd = e // h
        w, wo = g.param(m.in_proj_weight), g.param(m.out_proj.weight)
        for other in (k, v):
            g.union_arrays(q[-1], other[-1])
            for a, b in zip(k.dims[:-1], other.dims[:-1]):
                g.union_arrays(a, b)
        g.union_arrays(q[-1], w[1])
        # nn.MultiheadAttention needs its inner width equal to embed_dim: inner channel i goes with outer i,
        # and every head keeps the same positions so head_dim stays whole.
        for s in range(3):
            g.union_arrays(w[0][s * e:(s + 1) * e], w[1])
        g.union_arrays(wo[1], w[1])
        g.union_arrays(wo[0], w[1])
        for j in range(1, h):
            g.union_arrays(w[1][j * hd:(j + 1) * hd], w[1][:hd])
        if m.in_proj_bias is not None:
            bias = g.param(m.in_proj_bias)
            for s in range(3):
                g.union_arrays(bias[0][s * e:(s + 1) * e], w[1])
        if m.out_proj.bias is not None:
            g.union_arrays(g.param(m.out_proj.bias)[0], wo[0])
        g.produce(wo[0])
        for nm, i in (("key_padding_mask", 4), ("attn_mask", 6)):
            mask = _arg(la, lk, i, nm)
            if mask is not None:
                self.pin_all(mask, "attention mask")
        out = _T(q.dims[:-1] + [wo[0]])
        weights = self.fixed_like(result[1]) if isinstance(result, tuple) else None
        return (self.check(out, result[0]), weights)

    # -- shape rules ----------------------------------------------------------------------------------------
    def broadcast(self, args, kwargs, la, lk, result):
        g = self.g
        if not isinstance(result, torch.Tensor):
            raise _Opaque("elementwise op without a tensor result")
        tensors = [lab for lab in _flat_labels((la, lk))]
        nd = result.dim()
        out = []
        for d in range(nd):
            size = result.shape[d]
            full = []
            for lab in tensors:
                j = d - (nd - len(lab))
                if j < 0:
                    continue
                arr = lab[j]
                if len(arr) == size:
                    full.append(arr)
                elif len(arr) == 1:
                    g.pin(arr, "broadcast against a larger dimension")
                else:
                    raise _Opaque("elementwise op with shapes that do not broadcast")
            if not full:
                out.append(g.fixed_array(size))
                continue
            for other in full[1:]:
                g.union_arrays(full[0], other)
            out.append(full[0])
        return _T(out)

    def _merge(self, arrays):
        g = self.g
        if not arrays:
            return g.fixed_array(1)
        if len(arrays) == 1:
            return arrays[0]
        sizes = [len(a) for a in arrays]
        free = [i for i, a in enumerate(arrays) if g.free_mask(a).any()]
        if len(free) > 1:
            for i in free:
                g.pin(arrays[i], f"reshape merges two channel dimensions at {self.where}")
        carrier = free[0] if len(free) == 1 else int(np.argmax(sizes))
        shape = [1] * len(arrays)
        shape[carrier] = sizes[carrier]
        return np.broadcast_to(arrays[carrier].reshape(shape), sizes).reshape(-1).copy()

    def _split(self, flat, sizes):
        g = self.g
        if len(sizes) == 1:
            return [flat]
        grid = flat.reshape(sizes)
        nd = len(sizes)
        if not g.free_mask(flat).any():
            return [g.fixed_array(s) for s in sizes]
        for j in range(nd):
            if sizes[j] == 1 and math.prod(sizes) > 1:
                continue
            line = grid[tuple(slice(None) if i == j else 0 for i in range(nd))]
            shape = [1] * nd
            shape[j] = sizes[j]
            if np.array_equal(grid, np.broadcast_to(line.reshape(shape), sizes)):
                return [line.copy() if i == j else g.fixed_array(s) for i, s in enumerate(sizes)]
        # No single dim carries the channels (e.g. a channel shuffle): tie each position of the last dim
        # across the others, so every slice keeps the same positions and the split stays regular.
        j = max(i for i, s in enumerate(sizes) if s > 1)
        moved = np.moveaxis(grid, j, -1).reshape(-1, sizes[j])
        g.union_arrays(moved[1:].reshape(-1), np.tile(moved[0], len(moved) - 1))
        return [moved[0].copy() if i == j else g.fixed_array(s) for i, s in enumerate(sizes)]

    def reshape(self, x, result, sizes=None):
        g = self.g
        out_shape = list(result.shape)
        groups = _reshape_groups([len(a) for a in x.dims], out_shape)
        if groups is None:
            raise _Opaque("reshape of an empty tensor")
        out = [None] * len(out_shape)
        for ins, outs in groups:
            parts = self._split(self._merge([x[i] for i in ins]), [out_shape[j] for j in outs])
            for j, arr in zip(outs, parts):
                out[j] = arr
        if isinstance(sizes, fx.Node):
            prov = self.labels.get(sizes)
            sizes = list(prov) if isinstance(prov, tuple) else None
        if sizes is not None and len(sizes) == len(out_shape):
            for j, s in enumerate(sizes):
                if isinstance(s, fx.Node):
                    s = self.labels.get(s)
                if isinstance(s, _S):
                    # A size read from tensor dims must shrink exactly when this dim does: same free classes.
                    theirs = np.concatenate(s.arrays) if s.arrays else np.zeros(0, dtype=np.int64)
                    mine_free = set(g.roots(out[j][g.free_mask(out[j])]).tolist())
                    theirs_free = set(g.roots(theirs[g.free_mask(theirs)]).tolist())
                    if mine_free != theirs_free:
                        reason = f"view/reshape with a size read from other channels at {self.where}"
                        g.pin(out[j], reason)
                        g.pin(theirs, reason)
                elif not g.free_mask(out[j]).any() or (isinstance(s, int) and s == -1):
                    continue
                elif isinstance(s, int):
                    g.pin(out[j], f"view/reshape with the hard-coded size {s} at {self.where}")
                else:
                    g.pin(out[j], f"view/reshape with a size of unknown origin at {self.where}")
        return _T(out)

    def expand(self, x, result, sizes):
        g = self.g
        out_shape = list(result.shape)
        lead = len(out_shape) - len(x)
        out = [g.fixed_array(s) for s in out_shape[:lead]]
        for i, a in enumerate(x.dims):
            size = out_shape[lead + i]
            lit = sizes[lead + i] if sizes is not None and len(sizes) == len(out_shape) else None
            if len(a) == size:
                if isinstance(lit, int) and lit != -1:
                    g.pin(a, f"expand with the hard-coded size {lit} at {self.where}")
                out.append(a)
            else:
                g.pin(a, "broadcast against a larger dimension")
                out.append(g.fixed_array(size))
        return _T(out)

    def repeat(self, x, result):
        g = self.g
        out_shape = list(result.shape)
        lead = len(out_shape) - len(x)
        out = [g.fixed_array(s) for s in out_shape[:lead]]
        for i, a in enumerate(x.dims):
            if len(a) == out_shape[lead + i]:
                out.append(a)
            else:
                g.pin(a, f"repeat at {self.where}")
                out.append(g.fixed_array(out_shape[lead + i]))
        return _T(out)

    def permute(self, x, dims, result):
        dims = [_norm_dim(int(d), len(x)) for d in dims]
        return self.check(_T([x[d] for d in dims]), result)

    def transpose(self, x, d0, d1, result):
        dims = list(x.dims)
        d0, d1 = _norm_dim(int(d0), len(x)), _norm_dim(int(d1), len(x))
        dims[d0], dims[d1] = dims[d1], dims[d0]
        return self.check(_T(dims), result)

    def getattr_rule(self, x, attr, result):
        if attr == "shape" and isinstance(x, _T):
            return tuple(_S([a]) for a in x.dims)
        if not isinstance(result, torch.Tensor):
            return None
        if attr == "T":
            return self.check(_T(list(reversed(x.dims))), result)
        if attr == "mT":
            return self.transpose(x, -2, -1, result)
        if attr == "data":
            return self.check(x, result)
        raise _Opaque(f"tensor attribute {attr}")

    def getitem(self, args, la, result):
        g = self.g
        src, idx = args[0], args[1]
        x = la[0]
        if not isinstance(src, torch.Tensor):
            if isinstance(x, (tuple, list)) and isinstance(idx, int):
                return x[idx]
            if isinstance(x, (tuple, list)) and isinstance(idx, slice):
                return x[idx]
            return self.fixed_like(result)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(e, (torch.Tensor, list, bool)) for e in idx):
            raise _Opaque("advanced (tensor) indexing")
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
                g.pin(x[d], f"indexed by position at {self.where}")
                d += 1
            elif isinstance(e, slice):
                if e == slice(None):
                    out.append(x[d])
                else:
                    g.pin(x[d], f"sliced by position at {self.where}")
                    out.append(False)
                d += 1
            else:
                raise _Opaque(f"index of type {type(e).__name__}")
        out.extend(x.dims[d:])
        if len(out) != result.dim():
            raise _Opaque("indexing bookkeeping mismatch")
        dims = [a if isinstance(a, np.ndarray) else g.fixed_array(result.shape[i]) for i, a in enumerate(out)]
        return self.check(_T(dims), result)

    def matmul(self, a, b, result):
        g = self.g
        if a is None or b is None or not isinstance(result, torch.Tensor):
            raise _Opaque("matmul with a non-tensor operand")
        if len(a) >= 2 and len(b) >= 2:
            g.union_arrays(a[-1], b[-2])
            batch = self._broadcast_dims([a.dims[:-2], b.dims[:-2]], list(result.shape[:-2]))
            return self.check(_T(batch + [a[-2], b[-1]]), result)
        if len(a) == 1 and len(b) >= 2:
            g.union_arrays(a[0], b[-2])
            return self.check(_T(b.dims[:-2] + [b[-1]]), result)
        if len(b) == 1:
            g.union_arrays(a[-1], b[0])
            return self.check(_T(a.dims[:-1]), result)
        raise _Opaque("matmul of unexpected ranks")

    def _broadcast_dims(self, dim_lists, out_shape):
        g = self.g
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
                g.union_arrays(full[0], other)
            out.append(full[0] if full else g.fixed_array(out_shape[d]))
        return out

    def sdpa(self, args, kwargs, la, lk, result):
        g = self.g
        q, k, v = (_arg(la, lk, i, nm) for i, nm in enumerate(("query", "key", "value")))
        g.union_arrays(q[-1], k[-1])
        g.union_arrays(k[-2], v[-2])
        mask = _arg(la, lk, 3, "attn_mask")
        if mask is not None:
            self.pin_all(mask, "attention mask")
        batch = self._broadcast_dims([q.dims[:-2], k.dims[:-2], v.dims[:-2]], list(result.shape[:-2]))
        return self.check(_T(batch + [q[-2], v[-1]]), result)

    def pool(self, x, nsp, result):
        g = self.g
        if not isinstance(result, torch.Tensor):  # (values, indices)
            return tuple(self.pool(x, nsp, r) for r in result)
        for a in x.dims[len(x) - nsp:]:
            g.pin(a, _SPATIAL)
        return self.check(_T(x.dims[:len(x) - nsp] + [g.fixed_array(s) for s in result.shape[len(x) - nsp:]]),
                          result)

    def pad(self, x, pad, result):
        g = self.g
        dims = list(x.dims)
        for i in range(len(pad) // 2):
            d = len(x) - 1 - i
            if pad[2 * i] or pad[2 * i + 1]:
                g.pin(dims[d], f"padded at {self.where}")
                dims[d] = g.fixed_array(result.shape[d])
        return self.check(_T(dims), result)

    def roll(self, x, dims, result):
        g = self.g
        if dims is None:
            dims = range(len(x))
        for d in ([dims] if isinstance(dims, int) else dims):
            g.pin(x[_norm_dim(int(d), len(x))], f"rolled at {self.where}")
        return self.check(x, result)

    def cat(self, tensors, labels, dim, result):
        g = self.g
        nd = result.dim()
        dim = _norm_dim(int(dim), nd)
        labels = [lab for t, lab in zip(tensors, labels) if not (isinstance(t, torch.Tensor) and t.numel() == 0
                                                                   and t.dim() == 1)]
        out = []
        for d in range(nd):
            if d == dim:
                out.append(np.concatenate([lab[d] for lab in labels]))
            else:
                for lab in labels[1:]:
                    g.union_arrays(labels[0][d], lab[d])
                out.append(labels[0][d])
        return self.check(_T(out), result)

    def stack(self, labels, dim, result):
        g = self.g
        nd = result.dim()
        dim = _norm_dim(int(dim), nd)
        for lab in labels[1:]:
            for a, b in zip(labels[0].dims, lab.dims):
                g.union_arrays(a, b)
        dims = list(labels[0].dims)
        dims.insert(dim, g.fixed_array(len(labels)))
        return self.check(_T(dims), result)

    def split(self, name, x, args, kwargs, result):
        g = self.g
        if name == "unbind":
            dim = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), len(x))
            g.pin(x[dim], f"unbind at {self.where}")
            return tuple(_T(x.dims[:dim] + x.dims[dim + 1:]) for _ in result)
        default_dim = 0
        dim = _norm_dim(int(_arg(args, kwargs, 2, "dim", default_dim)), len(x))
        sizes = [r.shape[dim] for r in result]
        arr = x[dim]
        if len(result) > 1:
            if name == "chunk" and len(set(sizes)) == 1:
                s = sizes[0]  # chunk() splits by count: tie the chunks' positions so they stay equal
                for k in range(1, len(result)):
                    g.union_arrays(arr[k * s:(k + 1) * s], arr[:s])
            else:
                g.pin(arr, f"{name} with fixed sizes at {self.where}")
        out, start = [], 0
        for s in sizes:
            out.append(_T(x.dims[:dim] + [arr[start:start + s]] + x.dims[dim + 1:]))
            start += s
        return tuple(out)

    def reduce(self, name, x, rest, kwargs, result, la):
        g = self.g
        if name in ("max", "min") and rest and isinstance(rest[0], torch.Tensor):
            return self.broadcast((None,) + tuple(rest), kwargs, la, {}, result)
        if name == "norm":
            dim = kwargs.get("dim", rest[1] if len(rest) > 1 else None)
            keep = kwargs.get("keepdim", rest[2] if len(rest) > 2 else False)
        else:
            dim = kwargs.get("dim", rest[0] if rest and not isinstance(rest[0], bool) else None)
            keep = kwargs.get("keepdim", rest[1] if len(rest) > 1 and isinstance(rest[1], bool) else False)
        if dim is None:
            return self.fixed_like(result)
        dims = {_norm_dim(int(d), len(x)) for d in ([dim] if isinstance(dim, int) else dim)}
        out = []
        for d, a in enumerate(x.dims):
            if d not in dims:
                out.append(a)
            elif keep:
                out.append(g.fixed_array(1))
        if isinstance(result, torch.Tensor):
            return self.check(_T(out), result)
        return tuple(self.check(_T(out), r) for r in result)

    def owner_of(self, t):
        name = self.g.tensor_name(t) if isinstance(t, torch.Tensor) else None
        if name is None:
            return None
        mod_name = name.rpartition(".")[0]
        return self.g.model.get_submodule(mod_name)


_FAILED = object()  # the value of a node that could not run (and of everything computed from it)


def _has_failed(obj) -> bool:
    if obj is _FAILED:
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_failed(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_failed(o) for o in obj.values())
    return False


class _Opaque(Exception):
    """An op this module does not understand: every channel through it keeps its size."""


def _has_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_tensor(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_tensor(o) for o in obj.values())
    return False


def _has_labels(obj) -> bool:
    return any(True for _ in _flat_labels(obj))


def _flat_labels(obj):
    if isinstance(obj, _T):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flat_labels(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat_labels(o)


def _flat_sizes(obj):
    if isinstance(obj, _S):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flat_sizes(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat_sizes(o)


def _first_labels(la, lk):
    for lab in _flat_labels((la, lk)):
        return lab
    return None


def _clone_inputs(example_inputs):
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)


def build_channel_graph(model: nn.Module, example_inputs: tuple) -> ChannelGraph:
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
                gm = _trace(model, g.notes)
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
                _LabelInterpreter(gm, g, "train" if mode else "eval").run(*_clone_inputs(example_inputs))
    finally:
        model.train(was_training)
    return g
