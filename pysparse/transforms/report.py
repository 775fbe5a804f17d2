"""What :func:`pysparse.sparsify` reports: one :class:`LayerReport` per nn.Linear / nn.Conv2d it considered, gathered
in a :class:`SparsifyReport` (``model.sparsify_report``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .._text_table import left_aligned

__all__ = ["LayerReport", "SparsifyReport"]


@dataclass
class LayerReport:
    """What sparsify did with one nn.Linear / nn.Conv2d."""
    name: str
    kind: str                          # "Linear" or "Conv2d"
    shape: tuple                       # the dense weight's shape
    swapped: bool
    reason: str
    block_size: tuple | None = None    # the (bh, bw) it packs with (sparsify's, or its own with "auto")
    density: float | None = None       # fraction of (bh, bw) blocks kept, in the layout the layer packs
    dense_bytes: int = 0               # the dense weight
    packed_bytes: int | None = None    # values + indices of the packed weight
    dense_ms: float | None = None      # autotune: median time of the dense layer on the sample input
    sparse_ms: float | None = None     # autotune: median time of the sparse layer on the same input
    fused_activation: str | None = None  # fuse_activations: the activation now applied by this layer
    fused_residual: bool = False         # fuse_activations: the residual add its block's forward did after it


class SparsifyReport:
    """Per-layer decisions of :func:`sparsify` (``model.sparsify_report``); ``str()`` gives a table."""

    def __init__(self, layers: list[LayerReport], block_size: tuple[int, int] | str, min_sparsity: float):
        self.layers = layers
        self.block_size = block_size
        self.min_sparsity = min_sparsity
        self.attention: str | None = None  # what sparsify(fast_attention=True) did to the model's attention
        self.defaults: str | None = None   # which of sparsify's None defaults were resolved, to what and why

    @property
    def swapped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.swapped]

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r} in the report")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        return {"block_size": self.block_size if isinstance(self.block_size, str) else list(self.block_size),
                "min_sparsity": self.min_sparsity,
                "layers": [asdict(r) for r in self.layers], "attention": self.attention,
                "defaults": self.defaults}

    def __str__(self) -> str:
        head = ("layer", "type", "shape", "kept", "block", "density", "packed/dense", "reason")
        rows = []
        for r in self.layers:
            ratio = f"{r.packed_bytes / r.dense_bytes:.3f}" if r.packed_bytes is not None and r.dense_bytes else "-"
            rows.append((r.name or "<root>", r.kind, "x".join(map(str, r.shape)), "sparse" if r.swapped else "dense",
                         "-" if r.block_size is None else "x".join(map(str, r.block_size)),
                         "-" if r.density is None else f"{r.density:.3f}", ratio, r.reason))
        lines = left_aligned(head, rows)
        dense = sum(r.dense_bytes for r in self.layers)
        after = sum(r.packed_bytes if r.swapped else r.dense_bytes for r in self.layers)
        lines.append(f"{len(self.swapped)}/{len(self.layers)} layers sparse; weight bytes of these layers "
                     f"{dense / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
        if self.defaults is not None:
            lines.append(self.defaults)
        if self.attention is not None:
            lines.append(self.attention)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SparsifyReport({len(self.swapped)}/{len(self.layers)} layers sparse, block_size={self.block_size})"
