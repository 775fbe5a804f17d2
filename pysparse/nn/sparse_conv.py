"""SparseConv2d: nn.Conv2d whose weight is stored block-sparse and run as a bsr_linear GEMM over channels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._validate import as_pair, check_tensor
# Re-exported under conv names: the tap-major [O, kh*kw*I] view that pysparse.prune draws conv patterns on.
from .._weight_layout import weight_from_matrix as conv_weight_from_matrix
from .._weight_layout import weight_matrix as conv_weight_matrix
from ..formats import BlockSparseWeight
from ..ops.layer_support import check_activation, check_residual, fits_output, only_bias_wants_grad, torch_epilogue
from .packed_module import fill_dense, with_activation
from .sparse_linear import SparseLinear

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# im2col is built and multiplied in chunks of about this many bytes: big enough that the kernel sees long runs
# of tokens, small enough to stay cache-resident and below the allocation size that glibc serves with fresh
# (page-faulting) mmap memory on every call.
_IM2COL_CHUNK_BYTES = 4 << 20


def _padding_spec(padding) -> str | tuple[int, int]:
    """``padding`` as nn.Conv2d takes it: "valid", "same", an int >= 0 or a pair of them."""
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
        return padding
    pair = (padding, padding) if isinstance(padding, int) else padding
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pair)):
        raise ValueError(f"padding must be 'valid', 'same', an int >= 0 or a pair of them, got {padding!r}")
    return int(pair[0]), int(pair[1])


class SparseConv2d(nn.Module):
    """``nn.Conv2d`` (``groups=1``) with its weight ``[O, I, kh, kw]`` held block-sparse as an ``[O, kh*kw*I]`` matrix.

    Columns are tap-major (:func:`conv_weight_matrix`: ``weight.permute(0, 2, 3, 1).reshape(O, -1)``), so a
    (bh, bw) block is bh output channels x bw input channels of one kernel tap when ``bw`` divides ``I``; a block
    mask from a pruner must be drawn on that view to pack exactly (any ``mask`` is accepted, elementwise).
    Why tap-major: the GEMM runs on the channels-last (NHWC) view of the input, where the patch of one output
    pixel in (tap, channel) order is kh contiguous runs of kw*I values; im2col in that order is a plain copy,
    measured 5-10x faster here than building F.unfold's (channel, tap) order, which cost more than the dense conv.
    A 1x1 stride-1 convolution is a direct ``bsr_linear`` over channels. Others run ``bsr_conv2d_nhwc`` (implicit
    im2col: the kernel reads each output pixel's patch in place) in inference on the CPU paths that have it;
    otherwise (CUDA, training, other dtypes or blocks) a kxk one copies its patches into ``[*, kh*kw*I]`` chunks of
    ~4 MB and multiplies each, and a strided 1x1 one multiplies a strided view. The output has the values of the
    dense convolution and is laid out channels-last (as ``nn.Conv2d`` returns for channels-last input), which the
    next sparse conv reads copy-free.
    The packed weight lives in the child module ``linear`` (a :class:`SparseLinear`), whose buffers
    ``values`` / ``crow_indices`` / ``col_indices`` and ``bias`` form the state dict. ``activation`` (a key of
    ``pysparse.ops.ACTIVATIONS``) is held by that child too: every path applies it (the implicit-im2col op inside
    its kernel).
    """

    def __init__(self, weight: BlockSparseWeight, bias: torch.Tensor | None = None, *, in_channels: int,
                 kernel_size, stride=1, padding=0, dilation=1, padding_mode: str = "zeros", trainable: bool = False,
                 activation: str | None = None):
        super().__init__()
        if not isinstance(weight, BlockSparseWeight):
            raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int):
            raise TypeError(f"in_channels must be an int, got {type(in_channels).__name__}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.kernel_size = as_pair("kernel_size", kernel_size)
        self.stride = as_pair("stride", stride)
        self.dilation = as_pair("dilation", dilation)
        self.padding = _padding_spec(padding)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if self.padding == "same" and self.stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride {self.stride}")
        self.padding_mode = padding_mode
        self.in_channels = in_channels
        self.out_channels = weight.shape[0]
        kh, kw = self.kernel_size
        if weight.shape[1] != in_channels * kh * kw:
            raise ValueError(f"weight must have in_channels * kh * kw = {in_channels * kh * kw} columns for "
                             f"in_channels={in_channels} and kernel_size={self.kernel_size}, got shape {weight.shape}")
        self.linear = SparseLinear(weight, bias, trainable=trainable, activation=activation)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, block_size=(32, 32), mask: torch.Tensor | None = None, *,
                   trainable: bool = False, activation: str | None = None) -> "SparseConv2d":
        """Pack ``conv``'s weight viewed ``[O, kh*kw*I]`` (blocks with a nonzero, or the blocks ``mask`` keeps).

        ``mask`` has ``conv.weight``'s shape. Grouped (incl. depthwise) convolutions are refused: their weight is
        not one GEMM over all input channels. ``trainable=True`` makes the packed values an ``nn.Parameter``;
        ``activation`` (a key of ``pysparse.ops.ACTIVATIONS``) is applied after the convolution.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv.groups must be 1: grouped and depthwise convolutions have no block-sparse "
                             f"kernel (keep them dense), got groups={conv.groups}")
        if mask is not None:
            check_tensor("mask", mask, shape=tuple(conv.weight.shape))
            mask = conv_weight_matrix(mask)
        weight = BlockSparseWeight.from_dense(conv_weight_matrix(conv.weight.detach()), block_size=block_size,
                                              mask=mask)
        bias = conv.bias.detach() if conv.bias is not None else None
        return cls(weight, bias, in_channels=conv.in_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                   padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode, trainable=trainable,
                   activation=activation)

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def weight(self) -> BlockSparseWeight:
        """The packed ``[O, kh*kw*I]`` weight (see :func:`conv_weight_matrix`)."""
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def block_size(self) -> tuple[int, int]:
        return self.linear.block_size

    @property
    def density(self) -> float:
        return self.linear.density

    @property
    def activation(self) -> str | None:
        return self.linear.activation

    @activation.setter
    def activation(self, name: str | None) -> None:
        check_activation(name)
        self.linear.activation = name

    @property
    def activation_source(self) -> str | None:
        """The sibling activation module sparsify fused into this layer (see SparseLinear.activation_source)."""
        return self.linear.activation_source

    @activation_source.setter
    def activation_source(self, slot: str | None) -> None:
        self.linear.activation_source = slot

    def to_conv2d(self) -> nn.Module:
        """An equivalent dense nn.Conv2d (same device and dtype); with an activation,
        ``nn.Sequential(conv, <the activation module>)``."""
        values = self.linear.values
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                         padding_mode=self.padding_mode, device=values.device, dtype=values.dtype)
        weight = conv_weight_from_matrix(self.weight.to_dense(), conv.weight.shape)
        return with_activation(fill_dense(conv, weight, self.bias), self.activation)

    # ---- forward ------------------------------------------------------------------------------------------
    def _pads(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom), as F.pad takes them for the last two dims of NCHW."""
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            (kh, kw), (dh, dw) = self.kernel_size, self.dilation
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return tw // 2, tw - tw // 2, th // 2, th - th // 2
        ph, pw = self.padding
        return pw, pw, ph, ph

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(conv2d(x) + residual)``: ``residual`` (optional) is what a residual connection adds to this
        layer's output (ResNet's ``relu(conv(x) + identity)``), added as torch's ``+`` would; fused into the CPU
        kernel's epilogue when it has exactly the output's shape and dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"input must have shape [B, {self.in_channels}, H, W] or [{self.in_channels}, H, W] "
                             f"(in_channels={self.in_channels}), got {tuple(x.shape)}")
        check_residual(residual)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        pads = self._pads()
        if any(pads):
            if self.padding_mode == "zeros":
                # Pad the NHWC view: the padded copy comes out channels-last, the layout im2col reads best.
                x = F.pad(x.permute(0, 2, 3, 1), (0, 0, *pads))
            else:
                x = F.pad(x, pads, mode=self.padding_mode).permute(0, 2, 3, 1)
        else:
            x = x.permute(0, 2, 3, 1)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        b, h, w, c = x.shape
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        if h < span_h or w < span_w:
            raise ValueError(f"input of {h}x{w} (after padding) is smaller than the dilated kernel "
                             f"{span_h}x{span_w}")
        out_shape = (self.out_channels, (h - span_h) // sh + 1, (w - span_w) // sw + 1)
        activation = self.linear.activation
        fused = residual is None or fits_output(residual, out_shape if unbatched else (b, *out_shape), x)
        res = None
        if residual is not None and fused:
            res = (residual.unsqueeze(0) if unbatched else residual).permute(0, 2, 3, 1)  # NHWC, as y
        y = self._conv_nhwc(x, activation if fused else None, res).permute(0, 3, 1, 2)  # NCHW view, NHWC memory
        y = y.squeeze(0) if unbatched else y
        if not fused:  # a residual that broadcasts or promotes: torch adds it
            y = torch_epilogue(y, activation, residual)
        return y

    def _conv_nhwc(self, x: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
        """``[B, Ho, Wo, O]`` = activation(the convolution of the padded NHWC ``x`` + ``residual``), where
        ``residual`` is None or NHWC of the output's shape and dtype."""
        values, crow_indices, col_indices, bias = self.linear._packed_parts()
        (kh, kw), (sh, sw) = self.kernel_size, self.stride

        def gemm(rows, act=activation, res=None):  # rows of channels or patches -> rows of outputs
            return ops.bsr_linear_packed(rows, values, crow_indices, col_indices, bias, self.out_channels, act, res)

        if kh == 1 and kw == 1 and (sh, sw) == (1, 1):
            return gemm(x, res=residual)   # a view of the NHWC input: rows of channels, multiplied in place
        if self._implicit(x, values):
            if only_bias_wants_grad(bias, x, values):  # the op has no backward: torch adds the bias
                y = ops.bsr_conv2d_nhwc(x, values, crow_indices, col_indices, None, self.out_channels,
                                        self.kernel_size, self.stride, self.dilation, None, None) + bias
                return torch_epilogue(y, activation, residual)
            return ops.bsr_conv2d_nhwc(x, values, crow_indices, col_indices, bias, self.out_channels,
                                       self.kernel_size, self.stride, self.dilation, activation, residual)
        if kh == 1 and kw == 1:
            return gemm(x[:, ::sh, ::sw, :], res=residual)   # a view; the kernel packs it as it reads it
        if residual is None:
            return self._im2col_gemm(x, gemm)
        # The chunks' products first, then the residual and the activation over the whole output.
        y = self._im2col_gemm(x, lambda rows: gemm(rows, act=None))
        return torch_epilogue(y, activation, residual)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch views ``[B, Ho, Wo, kh, kw, C]`` of the padded NHWC ``x`` (thinned by the dilation)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        patches = x.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        return patches.permute(0, 1, 2, 4, 5, 3)

    def _implicit(self, x: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether the implicit-im2col op (no patch copies) runs this call: float32 on a CPU that has it, blocks
        that do not straddle two taps (bw divides C) with bh a multiple of 8, and no gradient needed for the input
        or the weight (the op has no backward; the im2col path goes through bsr_linear's). A bias that wants one is
        added by torch after the op."""
        bh, bw = self.block_size
        return (ops.implicit_conv2d_available() and x.is_cpu and x.dtype == torch.float32
                and values.dtype == torch.float32 and self.in_channels % bw == 0 and bh % 8 == 0
                and not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)))

    def _im2col_gemm(self, x: torch.Tensor, linear) -> torch.Tensor:
        """``[B, Ho, Wo, O]`` from the padded NHWC ``x`` through ``linear`` (rows of patches to rows of outputs), the
        patches copied chunk by chunk: whole images per chunk when they fit the chunk size, else bands of output rows
        of one image. With gradients, whole images always, split off ``x`` with ``torch.split``: its backward
        joins the chunks' gradients once, where a slice per chunk would add a zero-filled gradient of all of ``x``
        per chunk (quadratic in the chunks)."""
        patches = self._patches(x)
        b, ho, wo, kh, kw, c = patches.shape
        k = kh * kw * c
        rows = max(1, _IM2COL_CHUNK_BYTES // (wo * k * patches.element_size()))
        if torch.is_grad_enabled() and x.requires_grad:
            parts = [linear(self._patches(part).reshape(-1, ho, wo, k)) for part in x.split(max(1, rows // ho))]
        elif rows >= ho:
            step = rows // ho
            parts = [linear(patches[i:i + step].reshape(-1, ho, wo, k)) for i in range(0, b, step)]
        else:
            parts = [torch.cat([linear(patches[i:i + 1, r:r + rows].reshape(1, -1, wo, k))
                                for r in range(0, ho, rows)], dim=1) for i in range(b)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def extra_repr(self) -> str:
        bh, bw = self.block_size
        pad = f"'{self.padding}'" if isinstance(self.padding, str) else self.padding
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={pad}, dilation={self.dilation}, padding_mode={self.padding_mode}, "
                f"block_size=({bh}, {bw}), density={self.density:.3f}, bias={self.bias is not None}"
                + (f", activation={self.activation}" if self.activation else ""))
