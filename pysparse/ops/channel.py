"""Channel-sparse linear and convolution: weights zero outside kept output rows / channels and kept input columns /
channels. The ops ``pysparse::channel_sparse_linear`` and ``pysparse::channel_sparse_conv2d``, their wrappers, fake
kernels, pure-torch references and backward."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers torch.ops.pysparse.*)
from .._validate import as_pair
from .layer_support import call, check_count, conv_output_length

__all__ = ["channel_sparse_linear", "channel_sparse_linear_reference", "channel_sparse_conv2d",
           "channel_sparse_conv2d_reference"]


def _channel_index(name: str, t, limit: int, check: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    # int64 is range-checked even when not asked: the int32 cast below would wrap 2**32 + i to a valid i.
    if (check or t.dtype == torch.int64) and t.dim() == 1 and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} entries must lie in [0, {limit}), got min {lo}, max {hi}")
        if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
            raise ValueError(f"{name} must be strictly increasing (sorted, no repeats)")
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def channel_sparse_linear(input: torch.Tensor, values: torch.Tensor, out_index: torch.Tensor,
                          in_index: torch.Tensor, bias: torch.Tensor | None, out_features: int, *,
                          check_indices: bool = True) -> torch.Tensor:
    """``F.linear(input, W, bias)`` where ``W [out_features, in_features]`` is zero outside kept rows and columns.

    Gathers the kept input columns, multiplies by the kept block, scatters into the kept outputs: dropped outputs
    equal their bias (or 0), exactly as the masked dense layer gives.

    Args:
        input: ``[..., in_features]``, float32 / bfloat16 / float16.
        values: ``[len(out_index), len(in_index)]`` the kept block of W, input's dtype and device.
        out_index: kept output rows, int32 or int64, strictly increasing in ``[0, out_features)``.
        in_index: kept input columns, strictly increasing in ``[0, in_features)``.
        bias: ``[out_features]`` or None.
        out_features: rows of W.
        check_indices: validate the indices here first (on CUDA this synchronises once). Layers built from a
            ``ChannelSparseWeight`` pass False: it validated them. The CPU kernel always re-checks; the CUDA
            kernels skip out-of-range entries either way.
    Returns:
        ``[..., out_features]`` in the input's dtype.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 0:  # before the indices, whose range check would otherwise blame in_index
        raise ValueError("input must have at least 1 dimension [..., in_features], got a 0-d tensor")
    k = int(input.shape[-1])
    out_features = check_count("out_features", out_features)
    out_index = _channel_index("out_index", out_index, out_features, check_indices)
    in_index = _channel_index("in_index", in_index, k, check_indices)
    return call(torch.ops.pysparse.channel_sparse_linear.default, input, values, out_index, in_index, bias,
                 int(out_features))


@torch.library.register_fake("pysparse::channel_sparse_linear")
def _channel_sparse_linear_fake(input, values, out_index, in_index, bias, out_features):
    torch._check(values.dim() == 2, lambda: f"values must be 2-D, got {values.dim()}-D")
    torch._check(values.dtype == input.dtype, lambda: f"values dtype {values.dtype} != input dtype {input.dtype}")
    return input.new_empty((*input.shape[:-1], out_features))


def _channel_dense_weight(values, out_index, in_index, shape):
    w = values.new_zeros(shape)
    rows = w.index_select(0, out_index.long())
    rows.index_copy_(1, in_index.long(), values)
    return w.index_copy(0, out_index.long(), rows)


def channel_sparse_linear_reference(input, values, out_index, in_index, bias, out_features):
    """Pure-torch ``channel_sparse_linear``: densify W and call ``F.linear`` (test oracle, portable fallback)."""
    weight = _channel_dense_weight(values, out_index, in_index, (out_features, input.shape[-1]))
    return torch.nn.functional.linear(input, weight, bias)


def channel_sparse_conv2d(input: torch.Tensor, values: torch.Tensor, out_index: torch.Tensor,
                          in_index: torch.Tensor, bias: torch.Tensor | None, out_channels: int, stride=1,
                          padding=0, dilation=1, *, check_indices: bool = True) -> torch.Tensor:
    """``F.conv2d(input, W, bias, stride, padding, dilation)`` with ``W [out_channels, in_channels, kh, kw]``
    zero outside the kept output channels ``out_index`` and input channels ``in_index`` (groups=1).

    Reads only the kept input planes, convolves them with ``values [len(out_index), len(in_index), kh, kw]``,
    writes the kept output planes plus bias; dropped output planes equal their bias (or 0).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:  # before the indices, whose range check would otherwise blame in_index
        raise ValueError(f"input must be 4-D [batch, channels, height, width], got shape {tuple(input.shape)}")
    c = int(input.shape[1])
    out_channels = check_count("out_channels", out_channels)
    out_index = _channel_index("out_index", out_index, out_channels, check_indices)
    in_index = _channel_index("in_index", in_index, c, check_indices)
    pad = (padding, padding) if isinstance(padding, int) and not isinstance(padding, bool) else padding
    if not (isinstance(pad, (tuple, list)) and len(pad) == 2 and all(isinstance(p, int) and p >= 0 for p in pad)):
        raise ValueError(f"padding must be an int or a pair of ints >= 0, got {padding!r}")
    return call(torch.ops.pysparse.channel_sparse_conv2d.default, input, values, out_index, in_index, bias,
                 int(out_channels), list(as_pair("stride", stride)), list(pad), list(as_pair("dilation", dilation)))


@torch.library.register_fake("pysparse::channel_sparse_conv2d")
def _channel_sparse_conv2d_fake(input, values, out_index, in_index, bias, out_channels, stride, padding, dilation):
    torch._check(values.dim() == 4, lambda: f"values must be 4-D, got {values.dim()}-D")
    torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
    size = [conv_output_length(input.shape[2 + i] + 2 * padding[i], values.shape[2 + i], stride[i], dilation[i])
            for i in range(2)]
    return input.new_empty((input.shape[0], out_channels, *size))


def channel_sparse_conv2d_reference(input, values, out_index, in_index, bias, out_channels, stride=1, padding=0,
                                    dilation=1):
    """Pure-torch ``channel_sparse_conv2d``: densify W and call ``F.conv2d``."""
    weight = _channel_dense_weight(values, out_index, in_index, (out_channels, input.shape[1], *values.shape[2:]))
    return torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation)


# Backward of the channel-sparse ops in torch ops (so ChannelSparse layers fine-tune): gradients flow to the kept
# block, the input's kept channels and the whole bias (dropped outputs equal their bias).
def _csl_setup(ctx, inputs, output):
    input, values, out_index, in_index, bias, _ = inputs
    ctx.save_for_backward(input, values, out_index, in_index)
    ctx.has_bias = bias is not None


def _csl_backward(ctx, grad):
    input, values, out_index, in_index = ctx.saved_tensors
    gy = grad.index_select(-1, out_index.long())
    grad_input = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = input.new_zeros(input.shape).index_copy(-1, in_index.long(), gy @ values)
    if ctx.needs_input_grad[1]:
        xg = input.index_select(-1, in_index.long())
        grad_values = gy.reshape(-1, gy.shape[-1]).t() @ xg.reshape(-1, xg.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_input, grad_values, None, None, grad_bias, None


torch.library.register_autograd("pysparse::channel_sparse_linear", _csl_backward, setup_context=_csl_setup)


def _csc_setup(ctx, inputs, output):
    input, values, out_index, in_index, bias, _, stride, padding, dilation = inputs
    ctx.save_for_backward(input, values, out_index, in_index)
    ctx.has_bias = bias is not None
    ctx.conv = (stride, padding, dilation)


def _csc_backward(ctx, grad):
    input, values, out_index, in_index = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    gy = grad.index_select(1, out_index.long())
    xg = input.index_select(1, in_index.long())
    grad_input = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        gxg = torch.nn.grad.conv2d_input(xg.shape, values, gy, stride, padding, dilation)
        grad_input = input.new_zeros(input.shape).index_copy(1, in_index.long(), gxg)
    if ctx.needs_input_grad[1]:
        grad_values = torch.nn.grad.conv2d_weight(xg, values.shape, gy, stride, padding, dilation)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.sum((0, 2, 3))
    return grad_input, grad_values, None, None, grad_bias, None, None, None, None


torch.library.register_autograd("pysparse::channel_sparse_conv2d", _csc_backward, setup_context=_csc_setup)
