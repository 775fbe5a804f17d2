"""Custom ops (namespace ``pysparse``), their fake kernels for ``torch.compile``, and pure-torch references.

The compiled library ``pysparse._C`` registers the op schemas and the CPU/CUDA kernels with the dispatcher;
this module adds the Python-side pieces: a documented wrapper per op, a ``register_fake`` per op, and a
reference implementation that doubles as the test oracle.
"""
from __future__ import annotations

import numbers

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.pysparse.*)
from ._build_info import WITH_CUDA
from .formats.bsr import bsr_to_dense, check_bsr_indices

__all__ = ["bsr_linear", "bsr_linear_reference", "available_backends"]


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


def bsr_linear(input: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
               bias: torch.Tensor | None, out_features: int, *, check_indices: bool = True) -> torch.Tensor:
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
    if isinstance(out_features, bool) or not isinstance(out_features, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"out_features must be an int, got {type(out_features).__name__}")
    if out_features < 0:
        raise ValueError(f"out_features must be >= 0, got {out_features}")
    limit = max(int(values.shape[0]) if values.dim() else 0, 2**31 - 1)
    crow = _to_int32_indices("crow_indices", crow_indices, limit)
    col = _to_int32_indices("col_indices", col_indices, limit)
    if values.dim() == 3 and col.dim() == 1 and col.numel() != values.shape[0]:
        # Before the layout check, which would otherwise blame crow_indices[-1] for col_indices' length.
        raise ValueError(f"col_indices must have one entry per block ({values.shape[0]} blocks in values), "
                         f"got {col.numel()}")
    if check_indices and values.dim() == 3 and input.dim() >= 1:
        bh, bw = int(values.shape[1]), int(values.shape[2])
        if bh >= 1 and bw >= 1:
            check_bsr_indices(crow, col, -(-int(out_features) // bh), -(-int(input.shape[-1]) // bw))
    return torch.ops.pysparse.bsr_linear(input, values, crow, col, bias, int(out_features))


@torch.library.register_fake("pysparse::bsr_linear")
def _bsr_linear_fake(input, values, crow_indices, col_indices, bias, out_features):
    torch._check(values.dim() == 3, lambda: f"values must be 3-D, got {values.dim()}-D")
    torch._check(values.dtype == input.dtype, lambda: f"values dtype {values.dtype} != input dtype {input.dtype}")
    return input.new_empty((*input.shape[:-1], out_features))


def bsr_linear_reference(input, values, crow_indices, col_indices, bias, out_features):
    """Pure-torch ``bsr_linear``: densify W and call ``F.linear`` (the test oracle and a portable fallback)."""
    weight = bsr_to_dense(values, crow_indices, col_indices, (out_features, input.shape[-1]))
    return torch.nn.functional.linear(input, weight, bias)


def available_backends() -> dict:
    """What this build runs: ``{"cpu": <ISA path>, "cuda": bool}`` ("cuda" needs a CUDA build and a device)."""
    return {
        "cpu": _C.cpu_isa(),
        "cuda": bool(WITH_CUDA and torch.cuda.is_available()),
        "cuda_built": bool(WITH_CUDA),
    }

from . import autograd  # noqa: E402,F401  (registers bsr_linear's backward with torch.library)
