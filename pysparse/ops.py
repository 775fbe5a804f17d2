"""Custom ops (namespace ``pysparse``), their fake kernels for ``torch.compile``, and pure-torch references.

The compiled library ``pysparse._C`` registers the op schemas and the CPU/CUDA kernels with the dispatcher;
this module adds the Python-side pieces: a documented wrapper per op, a ``register_fake`` per op, and a
reference implementation that doubles as the test oracle.
"""
from __future__ import annotations

import numbers

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _C  # noqa: F401  (loading the library registers torch.ops.pysparse.*)
from ._build_info import WITH_CUDA
from ._validate import as_pair
from ._weight_layout import weight_from_matrix
from .formats.bsr import bsr_to_dense, check_bsr_indices

__all__ = ["bsr_linear", "bsr_linear_packed", "bsr_linear_reference", "available_backends", "ACTIVATIONS",
           "cpu_reads_transposed", "kernel_layout", "is_block_transposed"]


def _to_int32_indices(name: str, t: torch.Tensor, limit: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.int32:
        return t
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > limit):
        raise ValueError(f"{name} has entries outside [0, {limit}]: min {int(t.min())}, max {int(t.max())}")
    return t.to(torch.int32)


def _bsr_int32_indices(values: torch.Tensor, crow_indices, col_indices) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crow, col)`` as the kernels take them: int32, range-checked when they come as int64."""
    if (isinstance(crow_indices, torch.Tensor) and isinstance(col_indices, torch.Tensor)
            and crow_indices.dtype == col_indices.dtype == torch.int32):
        return crow_indices, col_indices  # what layers and formats pass: nothing to convert or range-check
    limit = max(int(values.shape[0]) if values.dim() else 0, 2**31 - 1)
    return (_to_int32_indices("crow_indices", crow_indices, limit),
            _to_int32_indices("col_indices", col_indices, limit))


def _wants_grad(*args) -> bool:
    """Whether autograd must see this call (a backward graph is wanted). Dual tensors of forward-mode AD are
    refused: no op here has a jvp formula, and torch would return the result without its tangent."""
    if _forward_ad._current_level >= 0 and any(
            isinstance(a, torch.Tensor) and _forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise NotImplementedError("pysparse ops have no forward-mode AD (jvp) formula: a dual tensor was passed")
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _only_bias_wants_grad(bias, *others) -> bool:
    """Whether ``bias`` is the one argument autograd must see (a frozen layer, whose bias is still a Parameter,
    called without no_grad): then the op runs without it and torch adds it, so autograd records one add instead of
    the op's Python autograd (~60 us a call, more than the kernel at batch 1). Same numbers: the kernels add the
    bias last, in float32, as that add does."""
    return bias is not None and torch.is_grad_enabled() and bias.requires_grad and not _wants_grad(*others)


def _call(op, *args):
    """``op(*args)``, below the autograd layer when no argument needs a gradient.

    The backward of these ops is registered from Python (``torch.library.register_autograd``), so every call,
    even under ``no_grad``, used to enter Python once more to find out no graph is wanted: ~10-25 us per call,
    as much as the whole kernel at batch 1. Under ``torch.compile`` the plain call is traced (no per-call cost).
    """
    if torch.compiler.is_compiling() or _wants_grad(*args):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# Activations bsr_linear can fuse: name -> the torch function it equals (exact GELU, not the tanh form).
ACTIVATIONS = {"relu": torch.nn.functional.relu, "relu6": torch.nn.functional.relu6, "gelu": torch.nn.functional.gelu}


def _check_activation(activation) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, got {activation!r}")


def bsr_linear_packed(input: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                      col_indices: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                      activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`bsr_linear` for parts a ``BlockSparseWeight`` already validated (int32 indices, consistent shapes):
    no Python-side checks; the op still checks what the caller passes per call (input's shape, dtype, device,
    and the residual's).

    ``activation`` (a key of ``ACTIVATIONS``, already validated) and ``residual`` (added as torch's ``+`` would) are
    fused into the CPU kernel when no gradient is wanted and the residual has exactly the output's shape and dtype;
    otherwise (training, CUDA, a residual that broadcasts or promotes) torch adds the residual and applies the
    activation after the op.
    """
    if (input.is_cpu and not _wants_grad(input, values, bias, residual)
            and (residual is None or _fits_output(residual, (*input.shape[:-1], out_features), input))):
        # The same kernel as bsr_linear, without a Python autograd kernel to step around: at batch 1 every
        # microsecond of Python is a few percent of the call.
        return torch.ops.pysparse.bsr_linear_act.default(input, values, crow_indices, col_indices, bias,
                                                         out_features, activation, residual)
    if input.is_cpu and input.dtype == torch.float32 and _only_bias_wants_grad(bias, input, values):
        # float32 only: in bf16 / fp16 rounding the product before the add would differ from the kernel by an ulp.
        y = torch.ops.pysparse.bsr_linear_act.default(input, values, crow_indices, col_indices, None, out_features,
                                                      None, None) + bias
        return _torch_epilogue(y, activation, residual)
    y = _call(torch.ops.pysparse.bsr_linear.default, input, values, crow_indices, col_indices, bias, out_features)
    return _torch_epilogue(y, activation, residual)


def _torch_epilogue(y: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """``activation(y + residual)`` in torch (either optional): what the CPU kernels' epilogue computes, for the
    paths that cannot fuse it (gradients, CUDA, a residual that broadcasts or promotes)."""
    if residual is not None:
        y = y + residual
    return y if activation is None else ACTIVATIONS[activation](y)


def _fits_output(residual: torch.Tensor, shape, like: torch.Tensor) -> bool:
    """Whether a kernel can add ``residual`` itself: exactly the output's ``shape`` and ``like``'s dtype and
    device (anything else is added by torch, with its broadcasting and type promotion)."""
    return residual.shape == tuple(shape) and residual.dtype == like.dtype and residual.device == like.device


def _check_residual(residual) -> None:
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")


def bsr_linear(input: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
               bias: torch.Tensor | None, out_features: int, *, check_indices: bool = True,
               activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(input, W, bias)`` where ``W [out_features, in_features]`` is block-sparse (BSR).

    Args:
        input: ``[..., in_features]``, float32 / bfloat16 / float16, any strides.
        values: ``[nnz_blocks, bh, bw]`` kept blocks, same dtype and device as ``input``.
        crow_indices: ``[ceil(out_features / bh) + 1]`` int32 or int64.
        col_indices: ``[nnz_blocks]`` int32 or int64, block-column of each block.
        bias: ``[out_features]`` or None.
        out_features: rows of W (the last block row may overhang it: padding).
        check_indices: validate the indices first (on CUDA this synchronises once). Layers built from
            ``BlockSparseWeight`` pass False: the format validated them when it was packed or loaded.
            The CPU kernel always re-checks them; the CUDA kernels clamp to their buffers either way.
        activation: None, "relu", "relu6" or "gelu" (exact, as ``F.gelu``): applied to the result. On the CPU, when no
            gradient is wanted, the kernel applies it to each result before storing it (no second pass over the
            output); otherwise the torch function runs after the op.
        residual: None or a tensor added before the activation, as torch's ``+`` would:
            ``activation(F.linear(input, W, bias) + residual)``; fused into the kernel like the activation when it
            has exactly the output's shape and dtype.
    Returns:
        ``[..., out_features]`` in the input's dtype.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    # Checked here so a bad value is named as such, not reported as a wrong crow_indices length.
    if type(out_features) is not int and (isinstance(out_features, bool)
                                          or not isinstance(out_features, (numbers.Integral, torch.SymInt))):
        raise TypeError(f"out_features must be an int, got {type(out_features).__name__}")
    if out_features < 0:
        raise ValueError(f"out_features must be >= 0, got {out_features}")
    _check_activation(activation)
    _check_residual(residual)
    crow, col = _bsr_int32_indices(values, crow_indices, col_indices)
    if values.dim() == 3 and col.dim() == 1 and col.numel() != values.shape[0]:
        # Before the layout check, which would otherwise blame crow_indices[-1] for col_indices' length.
        raise ValueError(f"col_indices must have one entry per block ({values.shape[0]} blocks in values), "
                         f"got {col.numel()}")
    if check_indices and values.dim() == 3 and input.dim() >= 1:
        bh, bw = int(values.shape[1]), int(values.shape[2])
        if bh >= 1 and bw >= 1:
            check_bsr_indices(crow, col, -(-int(out_features) // bh), -(-int(input.shape[-1]) // bw))
    return bsr_linear_packed(input, values, crow, col, bias, int(out_features), activation, residual)


@torch.library.register_fake("pysparse::bsr_linear")
def _bsr_linear_fake(input, values, crow_indices, col_indices, bias, out_features):
    torch._check(values.dim() == 3, lambda: f"values must be 3-D, got {values.dim()}-D")
    torch._check(values.dtype == input.dtype, lambda: f"values dtype {values.dtype} != input dtype {input.dtype}")
    return input.new_empty((*input.shape[:-1], out_features))


def _fake_with_residual(y: torch.Tensor, residual) -> torch.Tensor:
    """``y`` (a fake op's output), after the check the op makes of its residual's shape."""
    torch._check(residual is None or residual.shape == y.shape,
                 lambda: f"residual must have the output's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
    return y


@torch.library.register_fake("pysparse::bsr_linear_act")
def _bsr_linear_act_fake(input, values, crow_indices, col_indices, bias, out_features, activation, residual=None):
    return _fake_with_residual(_bsr_linear_fake(input, values, crow_indices, col_indices, bias, out_features),
                               residual)


def bsr_linear_reference(input, values, crow_indices, col_indices, bias, out_features):
    """Pure-torch ``bsr_linear``: densify W and call ``F.linear`` (the test oracle and a portable fallback)."""
    weight = bsr_to_dense(values, crow_indices, col_indices, (out_features, input.shape[-1]))
    return torch.nn.functional.linear(input, weight, bias)


_CPU_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def cpu_reads_transposed(bh: int, bw: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether this machine's CPU kernels read ``(bh, bw)`` blocks of ``dtype`` (float32, bfloat16 or float16)
    transposed at every batch size (the broadcast kernel: on AVX2 for bh a multiple of 16; on AVX-512, bh a multiple
    of 32, only with ``PYSPARSE_CPU_BCAST=1`` until measured there). ``bsr_linear`` then takes ``values`` laid out
    block-transposed (see :func:`is_block_transposed`) in place; any other layout works everywhere, through a
    row-major copy."""
    if dtype not in _CPU_DTYPE_NAMES:
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return _C.cpu_reads_transposed(int(bh), int(bw), _CPU_DTYPE_NAMES[dtype])


def kernel_layout(values: torch.Tensor) -> torch.Tensor:
    """``values [nnz, bh, bw]`` (same numbers) in the memory layout pysparse's kernels read on its device and dtype:
    block-transposed where :func:`cpu_reads_transposed` (on the CPU), row-major (contiguous) elsewhere.
    Returns ``values`` itself when it already is; otherwise a copy (``SparseLinear`` keeps its weight so; pass the
    result to :func:`bsr_linear` to get the same speed from the raw op)."""
    transposed = (values.device.type == "cpu" and values.dtype in _CPU_DTYPE_NAMES
                  and cpu_reads_transposed(*values.shape[1:], values.dtype))
    if transposed:
        return values if is_block_transposed(values) else values.transpose(1, 2).contiguous().transpose(1, 2)
    return values.contiguous()


def is_block_transposed(values: torch.Tensor) -> bool:
    """Whether ``values [nnz, bh, bw]`` stores each block column-major, blocks one after another
    (``values.transpose(1, 2)`` contiguous, ``values`` not), the layout :func:`cpu_reads_transposed` names."""
    nnz, bh, bw = values.shape
    return (nnz > 0 and bh > 1 and bw > 1 and not values.is_contiguous()
            and values.stride() == (bh * bw, 1, bh))


def available_backends() -> dict:
    """What this build runs: ``{"cpu": <ISA path>, "cuda": bool}`` ("cuda" needs a CUDA build and a device)."""
    return {
        "cpu": _C.cpu_isa(),
        "cuda": bool(WITH_CUDA and torch.cuda.is_available()),
        "cuda_built": bool(WITH_CUDA),
    }


# ---- block-sparse convolution (implicit im2col, CPU) ------------------------------------------------------------
__all__ += ["bsr_conv2d_nhwc", "bsr_conv2d_nhwc_reference", "implicit_conv2d_available"]


def implicit_conv2d_available() -> bool:
    """Whether :func:`bsr_conv2d_nhwc` runs on this CPU (it needs the AVX2 kernel path)."""
    return bool(_C.implicit_conv2d())


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
    _check_activation(activation)
    _check_residual(residual)
    crow, col = _bsr_int32_indices(values, crow_indices, col_indices)
    return torch.ops.pysparse.bsr_conv2d_nhwc(input, values, crow, col, bias, int(out_channels),
                                              list(as_pair("kernel_size", kernel_size)),
                                              list(as_pair("stride", stride)), list(as_pair("dilation", dilation)),
                                              activation, residual)


def _conv_out(size, k, s, d):
    """Output length of a convolution over ``size`` (padding included) with kernel k, stride s, dilation d."""
    return (size - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("pysparse::bsr_conv2d_nhwc")
def _bsr_conv2d_nhwc_fake(input, values, crow_indices, col_indices, bias, out_channels, kernel_size, stride,
                          dilation, activation=None, residual=None):
    torch._check(input.dim() == 4, lambda: f"input must be [B, Hp, Wp, C], got {input.dim()}-D")
    ho = _conv_out(input.shape[1], kernel_size[0], stride[0], dilation[0])
    wo = _conv_out(input.shape[2], kernel_size[1], stride[1], dilation[1])
    return _fake_with_residual(input.new_empty((input.shape[0], ho, wo, out_channels)), residual)


def bsr_conv2d_nhwc_reference(input, values, crow_indices, col_indices, bias, out_channels, kernel_size, stride=1,
                              dilation=1, activation=None, residual=None):
    """Pure-torch ``bsr_conv2d_nhwc``: densify W, fold it back to ``[O, C, kh, kw]`` and call ``F.conv2d``."""
    kh, kw = as_pair("kernel_size", kernel_size)
    c = input.shape[-1]
    matrix = bsr_to_dense(values, crow_indices, col_indices, (out_channels, kh * kw * c))
    weight = weight_from_matrix(matrix, (out_channels, c, kh, kw))
    y = torch.nn.functional.conv2d(input.permute(0, 3, 1, 2), weight, bias, as_pair("stride", stride), 0,
                                   as_pair("dilation", dilation))
    return _torch_epilogue(y.permute(0, 2, 3, 1), activation, residual)


from . import autograd  # noqa: E402,F401  (registers bsr_linear's backward with torch.library)


# ---- channel-sparse ops ---------------------------------------------------------------------------------------

__all__ += ["channel_sparse_linear", "channel_sparse_linear_reference", "channel_sparse_conv2d",
            "channel_sparse_conv2d_reference"]


def _channel_index(name: str, t, limit: int, check: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if check and t.dim() == 1 and t.numel():
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
    k = int(input.shape[-1]) if input.dim() else 0
    out_index = _channel_index("out_index", out_index, int(out_features), check_indices)
    in_index = _channel_index("in_index", in_index, k, check_indices)
    return _call(torch.ops.pysparse.channel_sparse_linear.default, input, values, out_index, in_index, bias,
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
    c = int(input.shape[1]) if input.dim() > 1 else 0
    out_index = _channel_index("out_index", out_index, int(out_channels), check_indices)
    in_index = _channel_index("in_index", in_index, c, check_indices)
    pad = (padding, padding) if isinstance(padding, int) and not isinstance(padding, bool) else padding
    if not (isinstance(pad, (tuple, list)) and len(pad) == 2 and all(isinstance(p, int) and p >= 0 for p in pad)):
        raise ValueError(f"padding must be an int or a pair of ints >= 0, got {padding!r}")
    return _call(torch.ops.pysparse.channel_sparse_conv2d.default, input, values, out_index, in_index, bias,
                 int(out_channels), list(as_pair("stride", stride)), list(pad), list(as_pair("dilation", dilation)))


@torch.library.register_fake("pysparse::channel_sparse_conv2d")
def _channel_sparse_conv2d_fake(input, values, out_index, in_index, bias, out_channels, stride, padding, dilation):
    torch._check(values.dim() == 4, lambda: f"values must be 4-D, got {values.dim()}-D")
    torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
    size = [_conv_out(input.shape[2 + i] + 2 * padding[i], values.shape[2 + i], stride[i], dilation[i])
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


# ---- scaled-dot-product attention (CPU, float32, inference) -----------------------------------------------------
__all__ += ["scaled_dot_product_attention", "attention_reference", "attention_kernel_applies"]


def attention_kernel_applies(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                             enable_gqa: bool = False) -> bool:
    """Whether :func:`scaled_dot_product_attention` runs pysparse's kernel for these arguments (else torch's)."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if any(t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    if dropout_p != 0.0 or _wants_grad(query, key, value, attn_mask):
        return False
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or is_causal or attn_mask.dim() > 4
                                  or attn_mask.dtype not in (torch.bool, torch.float32)
                                  or attn_mask.device.type != "cpu"):
        return False  # torch raises for a mask together with is_causal; let it say so
    b, h, sq, d = query.shape
    if key.shape[0] != b or value.shape[0] != b or key.shape[-1] != d or value.shape[1:3] != key.shape[1:3]:
        return False
    if attn_mask is not None:   # one that does not broadcast: torch's own error, as a drop-in should give
        full = (b, h, sq, key.shape[2])[4 - attn_mask.dim():]
        if any(m != f and m != 1 for m, f in zip(attn_mask.shape, full)):
            return False
    return key.shape[1] == h or (enable_gqa and key.shape[1] >= 1 and h % key.shape[1] == 0)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (same arguments, same result), in pysparse's CPU kernel where it applies.

    The kernel (``torch.ops.pysparse.attention``) runs float32 CPU tensors ``[batch, heads, seq, dim]`` of any
    strides with no dropout and no gradient wanted; a bool (True = attend) or float32 mask broadcasting to
    ``[batch, heads, q_len, kv_len]`` or ``is_causal``; grouped-query heads with ``enable_gqa``. Everything else
    (CUDA, other dtypes, training) goes to torch's function, so this is safe to call anywhere. Why it exists: once a
    transformer's Linear layers are block-sparse, the dense attention is most of what is left, and torch's CPU kernel
    runs BERT-size attention (short sequences, head dim 32-64) well below the cores' rate.

    Returns:
        ``[batch, heads, q_len, v_dim]`` as torch's; from the kernel it is a transposed view of a contiguous
        ``[batch, q_len, heads, v_dim]`` tensor, so ``out.transpose(1, 2).reshape(batch, q_len, -1)`` (what
        transformers does next) copies nothing.
    """
    if attention_kernel_applies(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
        return _attention_bshd(query, key, value, attn_mask, is_causal, scale).transpose(1, 2)
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                            dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                            **kwargs)


def _attention_bshd(query, key, value, attn_mask, is_causal, scale) -> torch.Tensor:
    """``torch.ops.pysparse.attention`` (``[batch, q_len, heads, v_dim]``) for arguments the kernel takes
    (:func:`attention_kernel_applies`), below the autograd layer."""
    return _call(torch.ops.pysparse.attention.default, query, key, value, attn_mask, bool(is_causal),
                 None if scale is None else float(scale))


@torch.library.register_fake("pysparse::attention")
def _attention_fake(query, key, value, attn_mask=None, is_causal=False, scale=None):
    torch._check(query.dim() == 4 and key.dim() == 4 and value.dim() == 4,
                 lambda: "query, key and value must be 4-D [batch, heads, seq, dim]")
    b, h, sq, _ = query.shape
    return query.new_empty((b, sq, h, value.shape[-1]))


def attention_reference(query, key, value, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """Pure-torch ``pysparse::attention`` in float64 (the test oracle): ``[batch, q_len, heads, v_dim]``; a mask and
    ``is_causal`` both apply; a query row that sees no key gives zeros."""
    q, k, v = (t.double() for t in (query, key, value))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] else 1.0   # as the op: scores are 0 anyway at head dim 0
    scores = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if is_causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key: 0, as torch's kernels give
    return (weights @ v).transpose(1, 2).to(query.dtype)
