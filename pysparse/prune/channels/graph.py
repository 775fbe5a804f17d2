"""The channel dependency graph: a union-find over *channel classes*, and what the surgery needs to know of them.

Every index of every tensor dimension the trace sees gets a label. Non-negative labels are channel classes;
coupling two dimensions unites their classes (a residual add unites the channels it adds). Negative labels are
fixed positions, each naming why it is fixed (``batch or spatial dimension``, ``model input``, ...). A class can
be *pinned* (it must keep its size; the first reason is kept for the report). Classes linked through any coupling
form a *family* (Torch-Pruning's "group"): the unit that is ranked, rounded and, if pruning it breaks the model,
rolled back. Only classes that some weight computes (a conv/linear output row: a *producer* dim) are removable.

Labels are int64 numpy arrays (one per tensor dim), so couplings of whole dimensions are vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["SPATIAL", "ChannelGraph", "ParamInfo", "RuleFailure", "SizeOrigin", "TensorLabels"]

SPATIAL = "batch or spatial dimension"


class TensorLabels:
    """Labels of one tensor: one int64 array per dimension (its length is the dimension's size)."""

    __slots__ = ("dims",)

    def __init__(self, dims):
        self.dims = list(dims)

    def __len__(self):
        return len(self.dims)

    def __getitem__(self, i):
        return self.dims[i]


class SizeOrigin:
    """Where a Python int computed from tensor sizes came from: the labels of every dim it was computed from
    (a ``view`` with such a size must shrink exactly when those dims do)."""

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


@dataclass
class RuleFailure:
    """A channel rule that raised: the op's channels were kept whole (pinned) instead of analysed."""

    node: str       # the fx node's name
    op: str         # the node's target: function, method name or module path and type
    where: str      # the module the node runs in
    error: str      # the exception, type and message

    def __str__(self) -> str:
        return f"the channel rule for {self.op} (node {self.node} in {self.where}) raised {self.error}"


class ChannelGraph:
    """Union-find over channel classes plus everything the surgery needs: param labels, conv modes, notes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._n = 0
        self._parent = np.zeros(1024, dtype=np.int64)   # class union-find (numpy: vectorised finds)
        self._fparent = np.zeros(1024, dtype=np.int64)  # family union-find over the same ids
        self._pinned_because: list[str | None] = []      # at roots: why the class is pinned (None = free)
        self.producer_dims: dict[int, np.ndarray] = {}   # id(labels) -> labels of a weight dim that makes channels
        self._fixed_reasons: list[str] = []
        self._fixed_ids: dict[str, int] = {}
        self.params: dict[int, ParamInfo] = {}  # id(tensor) -> info, created on first use
        self.conv_modes: dict[int, str] = {}    # id(weight) -> "dense" | "depthwise" | "grouped"
        self.bn_scales: dict[int, torch.Tensor] = {}  # id(tensor) -> a BatchNorm's weight (gamma), for slimming
        self.notes: list[str] = []              # ops handled conservatively (pinned), trace fallbacks
        self.rule_failures: list[RuleFailure] = []
        self._tensor_names = {}
        for qual, mod in model.named_modules(remove_duplicate=False):
            for pname, p in list(mod._parameters.items()) + list(mod._buffers.items()):
                if p is None:
                    continue
                full = f"{qual}.{pname}" if qual else pname
                is_param = pname in mod._parameters
                entry = self._tensor_names.setdefault(id(p), [full, is_param, []])
                entry[2].append((qual, pname))
        self.spatial_id = self.fixed_id(SPATIAL)

    # ---- classes --------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self._n

    def new_classes(self, n: int) -> np.ndarray:
        start = self._n
        while start + n > len(self._parent):
            self._parent = np.concatenate([self._parent, np.zeros_like(self._parent)])
            self._fparent = np.concatenate([self._fparent, np.zeros_like(self._fparent)])
        ids = np.arange(start, start + n, dtype=np.int64)
        self._parent[start:start + n] = ids
        self._fparent[start:start + n] = start  # classes made together (one param dim) start as one family
        self._n += n
        self._pinned_because.extend([None] * n)
        return ids

    def fixed_id(self, reason: str) -> int:
        if reason not in self._fixed_ids:
            self._fixed_reasons.append(reason)
            self._fixed_ids[reason] = -len(self._fixed_reasons)
        return self._fixed_ids[reason]

    def fixed_labels(self, n: int, reason: str | None = None) -> np.ndarray:
        return np.full(int(n), self.spatial_id if reason is None else self.fixed_id(reason), dtype=np.int64)

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

    def root(self, c: int) -> int:
        c = int(c)
        if c < 0:
            return c
        parent = self._parent
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = int(parent[c])
        return c

    def family(self, c: int) -> int:
        """The family (root id) of class ``c``."""
        c = int(c)
        fp = self._fparent
        while fp[c] != c:
            fp[c] = fp[fp[c]]
            c = int(fp[c])
        return c

    def is_free(self, root: int) -> bool:
        return self._pinned_because[root] is None

    def pin_reason(self, c: int) -> str | None:
        """Why class (or fixed id) ``c`` must keep its size; None when it may shrink."""
        if c < 0:
            return self._fixed_reasons[-1 - c]
        return self._pinned_because[self.root(c)]

    def _union_roots(self, ra: int, rb: int) -> None:
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._pinned_because[ra] = self._pinned_because[ra] or self._pinned_because[rb]
        fa, fb = self.family(ra), self.family(rb)
        if fa != fb:
            self._fparent[max(fa, fb)] = min(fa, fb)

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        """Index i of ``a`` and index i of ``b`` are the same channel: unite their classes (a fixed id pins)."""
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
                c = self.root(c)
                if self._pinned_because[c] is None:
                    self._pinned_because[c] = self._fixed_reasons[-1 - f]
        x, y = x[~fixed], y[~fixed]
        lo, hi = np.minimum(x, y), np.maximum(x, y)
        if len(np.unique(hi)) == len(hi) and not np.isin(hi, lo).any():
            # A matching between distinct roots (the common case: one dim's channels onto another's): link
            # all at once, then merge the (few, distinct) family pairs and carry pin reasons over.
            self._parent[hi] = lo
            for h, low in zip(hi.tolist(), lo.tolist()):
                if self._pinned_because[h] is not None and self._pinned_because[low] is None:
                    self._pinned_because[low] = self._pinned_because[h]
            fl, fh = self._vfind(self._fparent, lo), self._vfind(self._fparent, hi)
            for u, v in set(zip(fl.tolist(), fh.tolist())):
                u, v = self.family(u), self.family(v)
                if u != v:
                    self._fparent[max(u, v)] = min(u, v)
            return
        for u, v in zip(x.tolist(), y.tolist()):
            self._union_roots(self.root(u), self.root(v))

    def pin(self, arr: np.ndarray, reason: str) -> None:
        """Every class in ``arr`` keeps its size (the first reason given for a class is the one reported)."""
        for c in np.unique(self.roots(arr)).tolist():
            if c >= 0 and self._pinned_because[c] is None:
                self._pinned_because[c] = reason

    def mark_producer(self, arr: np.ndarray) -> None:
        """Mark a weight dim whose entries compute channels (conv/linear output rows): only such classes prune."""
        self.producer_dims[id(arr)] = arr

    def free_mask(self, arr: np.ndarray) -> np.ndarray:
        r = self.roots(arr)
        out = np.zeros(len(r), dtype=bool)
        for c in np.unique(r[r >= 0]).tolist():
            if self._pinned_because[c] is None:
                out[r == c] = True
        return out

    # ---- parameters -----------------------------------------------------------------------------------------
    def labels_of(self, t: torch.Tensor | None) -> TensorLabels | None:
        """Labels of a parameter/buffer (fresh classes per dim on first use, shared by every use after)."""
        if t is None:
            return None
        info = self.params.get(id(t))
        if info is None:
            name, is_param, holders = self._tensor_names.get(id(t), (None, True, []))
            if name is None:
                return TensorLabels(self.fixed_labels(s, "tensor that is not a model parameter or buffer")
                                    for s in t.shape)
            info = ParamInfo(name, t, [self.new_classes(s) for s in t.shape], list(holders), is_param)
            self.params[id(t)] = info
        return TensorLabels(info.labels)

    def tensor_name(self, t: torch.Tensor) -> str | None:
        entry = self._tensor_names.get(id(t))
        return entry[0] if entry else None
