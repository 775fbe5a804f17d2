"""Block-sparse convolution on channels-last input without a patch copy (implicit im2col, CPU): the op
``pysparse::bsr_conv2d_nhwc``, its wrapper, fake kernel and pure-torch reference. The op has no backward."""
from __future__ import annotations

import numbers

import torch

from .. import _C  # loading the library registers torch.ops.pysparse.*
from .._validate import as_pair
from .._weight_layout import weight_from_matrix
from ..formats.bsr import bsr_to_dense
from .layer_support import (bsr_int32_indices, check_activation, check_residual, conv_output_length,
                            fake_with_residual, torch_epilogue)

__all__ = ["bsr_conv2d_nhwc", "bsr_conv2d_nhwc_reference", "implicit_conv2d_available"]


# Read from the library once (and again when force_cpu_path switches the path): a C call inside SparseConv2d's forward
# would break torch.compile graphs, a module global does not.
_IMPLICIT_CONV2D = bool(_C.implicit_conv2d())


def implicit_conv2d_available() -> bool:
    """Whether :func:`bsr_conv2d_nhwc` runs on this CPU (it needs the AVX2 kernel path)."""
    return _IMPLICIT_CONV2D


def refresh_implicit_conv2d() -> None:
    """Read again whether the op runs (after the CPU path was switched)."""
    global _IMPLICIT_CONV2D
    _IMPLICIT_CONV2D = bool(_C.implicit_conv2d())


def bsr_conv2d_nhwc(input: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                    col_indices: torch.Tensor, bias: torch.Tensor | None, out_channels: int, kernel_size,
                    stride=1, dilation=1, activation: str | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d`` of an already zero-padded channels-last input with a block-sparse weight, no patch copied.

    Args:
        input: ``[B, Hp, Wp, C]`` float32 on the CPU (padding already applied; the op adds none).
        values, crow_indices, col_indices: the weight ``[out_channels, kh*kw*C]`` in BSR form, columns tap-major
            (``pysparse.nn.conv_weight_matrix``); ``bw`` must divide ``C`` and ``bh`` be a multiple of 8.
        bias: ``[out_channels]`` or None.
        kernel_size, stride, dilation: ints or pairs.
        activation: None, "relu", "relu6" or "gelu" (exact), applied to each result in the kernel.
        residual: None or a ``[B, Ho, Wo, out_channels]`` tensor added before the activation (ResNet's
            ``relu(conv(x) + identity)`` in one pass over the output).
    Returns:
        ``[B, Ho, Wo, out_channels]`` (``permute(0, 3, 1, 2)`` gives the NCHW view, channels-last in memory).
    The kernel is the broadcast kernel of ``bsr_linear`` reading each output pixel's patch in place; where it
    cannot run (see :func:`implicit_conv2d_available`) the op raises ValueError and ``SparseConv2d`` uses im2col.
    """
    if not isinstance(input, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"input and values must be torch.Tensors, got {type(input).__name__} and "
                        f"{type(values).__name__}")
    if isinstance(out_channels, bool) or not isinstance(out_channels, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"out_channels must be an int, got {type(out_channels).__name__}")
    check_activation(activation)
    check_residual(residual)
    crow, col = bsr_int32_indices(values, crow_indices, col_indices)
    return torch.ops.pysparse.bsr_conv2d_nhwc(input, values, crow, col, bias, int(out_channels),
                                              list(as_pair("kernel_size", kernel_size)),
                                              list(as_pair("stride", stride)), list(as_pair("dilation", dilation)),
                                              activation, residual)



@torch.library.register_fake("pysparse::bsr_conv2d_nhwc")
def _bsr_conv2d_nhwc_fake(input, values, crow_indices, col_indices, bias, out_channels, kernel_size, stride,
                          dilation, activation=None, residual=None):
    torch._check(input.dim() == 4, lambda: f"input must be [B, Hp, Wp, C], got {input.dim()}-D")
    ho = conv_output_length(input.shape[1], kernel_size[0], stride[0], dilation[0])
    wo = conv_output_length(input.shape[2], kernel_size[1], stride[1], dilation[1])
    return fake_with_residual(input.new_empty((input.shape[0], ho, wo, out_channels)), residual)


def bsr_conv2d_nhwc_reference(input, values, crow_indices, col_indices, bias, out_channels, kernel_size, stride=1,
                              dilation=1, activation=None, residual=None):
    """Pure-torch ``bsr_conv2d_nhwc``: densify W, fold it back to ``[O, C, kh, kw]`` and call ``F.conv2d``."""
    kh, kw = as_pair("kernel_size", kernel_size)
    c = input.shape[-1]
    matrix = bsr_to_dense(values, crow_indices, col_indices, (out_channels, kh * kw * c))
    weight = weight_from_matrix(matrix, (out_channels, c, kh, kw))
    y = torch.nn.functional.conv2d(input.permute(0, 3, 1, 2), weight, bias, as_pair("stride", stride), 0,
                                   as_pair("dilation", dilation))
    return torch_epilogue(y.permute(0, 2, 3, 1), activation, residual)
