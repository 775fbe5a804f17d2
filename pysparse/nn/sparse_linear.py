"""SparseLinear: nn.Linear whose weight is stored block-sparse and multiplied by the bsr_linear kernels; its
UnstructuredSparseLinear form (``block_size=(1, 1)``) holds an unstructured weight for the unstructured kernel."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._validate import as_pair
from ..formats import BlockSparseWeight, UnstructuredSparseWeight
from ..ops.layer_support import check_activation, check_residual, torch_epilogue
from ..ops.unstructured_linear import pack_for_kernel
from .packed_module import PackedWeightModule, fill_dense, with_activation


class SparseLinear(PackedWeightModule):
    """``y = x @ W^T + b`` with ``W [out_features, in_features]`` held as a :class:`BlockSparseWeight`.

    The packed parts are buffers (``values``, ``crow_indices``, ``col_indices``), so ``.to()``, ``state_dict``
    and ``load_state_dict`` work as for any module; loading a state dict of another sparsity pattern replaces
    the buffers after validating them.

    ``activation`` ("relu", "relu6" or "gelu", exact) makes the layer ``activation(x @ W^T + b)``: fused into the CPU
    kernel's output tiles at inference (``sparsify(fuse_activations=True)`` sets it where the model applies
    that activation right after the layer); with gradients, or on CUDA, the torch function runs after the op.
    """

    _weight_class = BlockSparseWeight

    def __init__(self, weight: BlockSparseWeight, bias: torch.Tensor | None = None, *, trainable: bool = False,
                 activation: str | None = None):
        super().__init__()
        if not isinstance(weight, self._weight_class):
            raise TypeError(f"weight must be a {self._weight_class.__name__}, got {type(weight).__name__}")
        check_activation(activation)
        self.activation = activation
        # Set by sparsify when the activation was taken from a sibling module (this attribute of the parent,
        # now an nn.Identity): pysparse.save records it so load can redo the fusion on a fresh dense model.
        self.activation_source: str | None = None
        self.out_features, self.in_features = weight.shape
        if trainable:
            # A Parameter (same state_dict key) so optimizers train the kept blocks; the pattern stays fixed.
            self.values = nn.Parameter(weight.values)
        else:
            self.register_buffer("values", weight.values)
        for name in self._weight_class._index_names:
            self.register_buffer(name, getattr(weight, name))
        self._settle_layout()
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,):
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias must be a tensor of shape ({self.out_features},), got {got}")
            self.bias = nn.Parameter(bias.detach().to(weight.values.dtype).clone())
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size=(32, 32), mask: torch.Tensor | None = None, *,
                   trainable: bool = False, activation: str | None = None) -> "SparseLinear":
        """Pack ``linear``'s weight (keeping blocks with a nonzero, or the blocks ``mask`` keeps).

        ``block_size=(1, 1)`` is unstructured sparsity, with its own format and kernel: the result is an
        :class:`UnstructuredSparseLinear` (a SparseLinear) holding an :class:`UnstructuredSparseWeight`.
        ``trainable=True`` holds ``values`` as an ``nn.Parameter`` (fine-tuning the kept blocks), else a buffer.
        ``activation`` is applied after the layer (see the class docstring).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.detach() if linear.bias is not None else None
        if as_pair("block_size", block_size) == (1, 1):
            weight = pack_for_kernel(linear.weight.detach(), mask)
            return UnstructuredSparseLinear(weight, bias, trainable=trainable, activation=activation)
        weight = BlockSparseWeight.from_dense(linear.weight.detach(), block_size=block_size, mask=mask)
        return cls(weight, bias, trainable=trainable, activation=activation)

    @property
    def weight(self) -> BlockSparseWeight:
        return BlockSparseWeight(self.values, self.crow_indices, self.col_indices,
                                 (self.out_features, self.in_features))

    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def density(self) -> float:
        n_br = -(-self.out_features // self.block_size[0])
        n_bc = -(-self.in_features // self.block_size[1])
        return self.values.shape[0] / (n_br * n_bc) if n_br * n_bc else 0.0

    def to_linear(self) -> nn.Module:
        """An equivalent dense nn.Linear (same device and dtype); with an activation,
        ``nn.Sequential(linear, <the activation module>)``."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        return with_activation(fill_dense(linear, self.weight.to_dense(), self.bias), self.activation)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_dropout: nn.Module | None = None) -> torch.Tensor:
        """``activation(x @ W^T + bias + residual)``: ``residual`` (optional) is what a residual connection adds to
        this layer's output, added as torch's ``+`` would; fused into the CPU kernel's epilogue when it has exactly
        the output's shape and dtype. ``residual_dropout`` (an ``nn.Dropout``, with a residual) makes it
        ``activation(residual_dropout(x @ W^T + bias) + residual)``: while the dropout is active (training, p > 0)
        that runs in torch, otherwise the dropout is the identity and the add stays fused."""
        # The op cannot see in_features: a K that rounds up to the same number of block columns would run on
        # the padded weight and return a wrong result instead of failing.
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}")
        check_residual(residual)
        if residual_dropout is not None:
            if residual is None:
                raise ValueError("residual_dropout needs a residual (it is applied before the residual add)")
            if residual_dropout.training and residual_dropout.p > 0:
                return torch_epilogue(residual_dropout(self._product(x, None, None)), self.activation, residual)
        return self._product(x, self.activation, residual)

    def _product(self, x: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
        """``activation(x @ W^T + bias + residual)`` through this layer's op (the one thing subclasses change)."""
        values, crow_indices, col_indices, bias = self._packed_parts()
        # Indices were validated when the weight was packed or loaded: skip the per-call check.
        return ops.bsr_linear_packed(x, values, crow_indices, col_indices, bias, self.out_features, activation,
                                     residual)

    def _packed_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _settle_layout(self) -> None:
        """Holds ``values`` block-transposed (each block column-major: ``values.transpose(1, 2)`` contiguous) where
        the CPU kernels read blocks that way at every batch size (``ops.cpu_reads_transposed``: AVX2 with bh a multiple
        of 16, AVX-512 float32 with bh a multiple of 32; ``ops.kernel_layout``), row-major (contiguous) everywhere
        else. Same shape, numbers and state dict, other strides: the kernel reads the layer's own memory, so nothing is
        re-laid-out per call and every write to ``values`` (in place, through ``.data``, by a fused optimizer) is what
        the next call computes with."""
        v = self.values
        laid_out = ops.kernel_layout(v.detach())
        if laid_out.data_ptr() == v.data_ptr() and laid_out.stride() == v.stride():
            return
        if isinstance(v, nn.Parameter):
            v.data = laid_out  # the Parameter object optimizers hold stays
        else:
            self.values = laid_out

    def extra_repr(self) -> str:
        bh, bw = self.block_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size=({bh}, {bw}), "
                f"density={self.density:.3f}, bias={self.bias is not None}"
                + (f", activation={self.activation}" if self.activation else ""))


class UnstructuredSparseLinear(SparseLinear):
    """:class:`SparseLinear` with an unstructured weight (``block_size=(1, 1)``): ``W`` held as an
    :class:`UnstructuredSparseWeight`, multiplied by ``pysparse.ops.unstructured_linear`` (CPU float32; other
    devices and dtypes take its dense reference). Buffers ``values``, ``columns``, ``segment_ptr``; ``.to()``,
    ``state_dict``, ``load_state_dict`` and ``pysparse.save`` / ``load`` work as for SparseLinear, and so does the
    fused epilogue (activation and residual applied by the kernel; with gradients GELU runs after it)."""

    _weight_class = UnstructuredSparseWeight

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size=(1, 1), mask: torch.Tensor | None = None, *,
                   trainable: bool = False, activation: str | None = None) -> UnstructuredSparseLinear:
        """Pack ``linear``'s nonzero weights (or those ``mask`` keeps); ``block_size`` must be (1, 1)."""
        if as_pair("block_size", block_size) != (1, 1):
            raise ValueError(f"UnstructuredSparseLinear holds block_size (1, 1), got {block_size!r}: use "
                             f"SparseLinear.from_dense for blocks")
        return SparseLinear.from_dense(linear, (1, 1), mask, trainable=trainable, activation=activation)

    @property
    def weight(self) -> UnstructuredSparseWeight:
        return UnstructuredSparseWeight(self.values, self.columns, self.segment_ptr,
                                        (self.out_features, self.in_features))

    @property
    def block_size(self) -> tuple[int, int]:
        return (1, 1)

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.values.shape[0] / total if total else 0.0

    def _product(self, x: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
        values, columns, segment_ptr, bias = self._packed_parts()
        # Indices were validated when the weight was packed or loaded: the op checks only what memory safety needs.
        return ops.unstructured_linear_packed(x, values, columns, segment_ptr, bias, self.out_features, activation,
                                              residual)

    def _settle_layout(self) -> None:
        """``values`` contiguous: the kernel reads it front to back."""
        v = self.values
        if v.is_contiguous():
            return
        if isinstance(v, nn.Parameter):
            v.data = v.data.contiguous()
        else:
            self.values = v.contiguous()
