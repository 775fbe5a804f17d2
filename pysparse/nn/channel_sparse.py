"""ChannelSparseLinear / ChannelSparseConv2d: drop-in layers that compute only kept output channels from kept inputs.

For when graph surgery (``pysparse.prune.prune_channels``) is not possible or not wanted: the layer keeps the
dense layer's input and output shapes, and equals the dense layer whose dropped rows and columns are zero.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._validate import as_pair
from ..formats.channel_sparse import ChannelSparseWeight
from .packed_module import PackedWeightModule, fill_dense

__all__ = ["ChannelSparseLinear", "ChannelSparseConv2d"]


class _ChannelSparseBase(PackedWeightModule):
    """Shared storage: buffers ``values``, ``out_index``, ``in_index`` (a ChannelSparseWeight) and a ``bias``."""

    _weight_class = ChannelSparseWeight

    def _packed_shape(self) -> tuple:
        return self._shape

    def _init_storage(self, weight: ChannelSparseWeight, bias: torch.Tensor | None, n_out: int):
        self.register_buffer("values", weight.values)
        self.register_buffer("out_index", weight.out_index)
        self.register_buffer("in_index", weight.in_index)
        self._shape = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,):
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"bias must be a tensor of shape ({n_out},), got {got}")
            self.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype).clone())
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> ChannelSparseWeight:
        return ChannelSparseWeight(self.values, self.out_index, self.in_index, self._shape)

    @property
    def density(self) -> float:
        return self.weight.density


class ChannelSparseLinear(_ChannelSparseBase):
    """``nn.Linear`` that keeps output rows ``out_index`` and input columns ``in_index`` of its weight.

    ``forward(x)`` equals ``F.linear(x, W_masked, bias)``: kept outputs are computed from the kept inputs only
    (one fused gather-GEMM-scatter op); dropped outputs are the bias (or 0). Input ``[..., in_features]``,
    output ``[..., out_features]``, as the dense layer.
    """

    def __init__(self, weight: ChannelSparseWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, ChannelSparseWeight):
            raise TypeError(f"weight must be a ChannelSparseWeight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self._init_storage(weight, bias, self.out_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear, out_index=None, in_index=None) -> "ChannelSparseLinear":
        """Keep rows ``out_index`` / columns ``in_index`` of ``linear.weight`` (None: those holding a nonzero)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = ChannelSparseWeight.from_dense(linear.weight.detach(), out_index, in_index)
        return cls(weight, linear.bias.detach() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Indices were validated when the weight was packed or loaded: skip the per-call check.
        return ops.channel_sparse_linear(x, *self._packed_parts(), self.out_features, check_indices=False)

    def to_linear(self) -> nn.Linear:
        """An equivalent dense nn.Linear (same device and dtype)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        return fill_dense(linear, self.weight.to_dense(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kept_in={self.in_index.numel()}, kept_out={self.out_index.numel()}, bias={self.bias is not None}")


class ChannelSparseConv2d(_ChannelSparseBase):
    """``nn.Conv2d`` (groups=1, zero padding) that keeps output channels ``out_index`` and input channels
    ``in_index``: reads only the kept input planes and computes only the kept output planes; dropped output
    planes are the bias (or 0). Same input and output shapes as the dense layer.
    """

    def __init__(self, weight: ChannelSparseWeight, bias: torch.Tensor | None = None, stride=1, padding=0,
                 dilation=1):
        super().__init__()
        if not isinstance(weight, ChannelSparseWeight):
            raise TypeError(f"weight must be a ChannelSparseWeight, got {type(weight).__name__}")
        if len(weight.shape) != 4:
            raise ValueError(f"weight must be 4-D [out, in, kh, kw], got shape {weight.shape}")
        self.out_channels, self.in_channels = weight.shape[:2]
        self.kernel_size = tuple(weight.shape[2:])
        self.stride = as_pair("stride", stride)
        self.dilation = as_pair("dilation", dilation)
        pad = (padding, padding) if isinstance(padding, int) and not isinstance(padding, bool) else padding
        if not (isinstance(pad, (tuple, list)) and len(pad) == 2 and
                all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pad)):
            raise ValueError(f"padding must be an int or a pair of ints >= 0, got {padding!r}")
        self.padding = tuple(pad)
        self._init_storage(weight, bias, self.out_channels)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, out_index=None, in_index=None) -> "ChannelSparseConv2d":
        """Keep output channels ``out_index`` / input channels ``in_index`` of ``conv`` (None: those with a
        nonzero weight). Needs groups=1 and zero padding (``padding='valid'`` or explicit sizes)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"ChannelSparseConv2d needs groups=1, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"ChannelSparseConv2d needs padding_mode='zeros', got {conv.padding_mode!r}")
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        if isinstance(padding, str):
            raise ValueError(f"ChannelSparseConv2d needs explicit padding sizes, got padding={padding!r}")
        weight = ChannelSparseWeight.from_dense(conv.weight.detach(), out_index, in_index)
        return cls(weight, conv.bias.detach() if conv.bias is not None else None, conv.stride, padding,
                   conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.channel_sparse_conv2d(x, *self._packed_parts(), self.out_channels, self.stride, self.padding,
                                         self.dilation, check_indices=False)

    def to_conv2d(self) -> nn.Conv2d:
        """An equivalent dense nn.Conv2d (same device and dtype)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=self.values.device,
                         dtype=self.values.dtype)
        return fill_dense(conv, self.weight.to_dense(), self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, kept_in={self.in_index.numel()}, "
                f"kept_out={self.out_index.numel()}, bias={self.bias is not None}")
