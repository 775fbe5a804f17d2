"""``pysparse::unstructured_linear``: ``F.linear`` with an unstructured sparse weight (any pattern of zeros), in the
layout of :class:`pysparse.formats.UnstructuredSparseWeight`; its fake kernel, its backward and a pure-torch
reference.

The kernel is CPU and float32 only. The wrappers here fall back explicitly to the reference (the weight made dense,
then ``F.linear``: the same result at dense speed) for CUDA tensors and other dtypes; the raw op raises for them.

Backward (registered with ``torch.library.register_autograd``), for float32 CPU tensors on kernels whose work is in
proportion to the kept entries, like the forward's: ``grad_x = grad_y @ W`` is the forward kernel run on ``W^T`` in the
same format (``pysparse::unstructured_transpose``: its indices and the permutation of the values, built once per
weight layout and cached, then ``values[perm]`` per call), and ``grad_values = grad_y^T @ x`` at the kept entries is
``pysparse::unstructured_linear_grad_values``. Other devices and dtypes go through the dense ``[N, K]`` weight or its
gradient (O(N K) memory, dense time).
"""
from __future__ import annotations

import numbers

import torch

from ..formats.unstructured import BLOCK_COLS, UnstructuredSparseWeight, entry_segments, unstructured_to_dense
from .cpu_path import current_cpu_path
from .gradient_rows import as_rows, gather_gradient_rows, rows_to_full
from .layer_support import (LayoutCache, call, check_activation, check_residual, epilogue_autograd, fits_output,
                            torch_epilogue, train_epilogue, wants_grad)

__all__ = ["kernel_block_cols", "pack_for_kernel", "unstructured_linear", "unstructured_linear_packed",
           "unstructured_linear_reference"]


def kernel_block_cols(density: float) -> int:
    """The column-block width (:attr:`UnstructuredSparseWeight.block_cols`) a weight of this ``density`` (kept
    fraction, in [0, 1]) runs fastest at on this process's CPU path; the layers pack with it.

    A segment (a row's entries in one column block) costs the kernel a loop exit and a load and store of the row's
    partial sums, and at 90% sparsity a 128-wide block holds a dozen entries a row. The AVX2 path runs 64-token tiles
    on 128-wide blocks and 32-token tiles on wider ones (whose x would not stay in L1 at 64 tokens); measured on AMD
    Zen 3 (2 threads, the 4 FFN shapes, one binary alternating the variants; BENCHMARKS.md): below 15% kept, 512
    columns run the batch-1 gathers 1.4-1.6x those of 128 and the tiles 0.98-1.09x those of 128 columns on 64-token
    tiles; from 15% on, 128 columns on 64-token tiles run the tiles 0.93-1.17x those of 32-token tiles on 256 columns
    (1.06-1.17x at 50%), and batch 1 0.8-0.9x. The AVX-512 path's 64-token tiles already fill L1 at 128 columns: it
    keeps 128 (not measured wider), as the generic path does.
    """
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a number, got {type(density).__name__}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if current_cpu_path()[0] == "avx2" and density < 0.15:
        return 512
    return BLOCK_COLS


def pack_for_kernel(weight: torch.Tensor, mask: torch.Tensor | None = None) -> UnstructuredSparseWeight:
    """:meth:`UnstructuredSparseWeight.from_dense` at the column-block width this CPU's kernel runs fastest for the
    kept fraction (:func:`kernel_block_cols`)."""
    keep = UnstructuredSparseWeight.kept_entries(weight, mask)
    density = int(torch.count_nonzero(keep)) / keep.numel() if keep.numel() else 1.0
    return UnstructuredSparseWeight.from_dense(weight, keep, block_cols=kernel_block_cols(density))


def unstructured_linear(input: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, segment_ptr: torch.Tensor,
                        bias: torch.Tensor | None, out_features: int, *, check_indices: bool = True,
                        activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(F.linear(input, W, bias) + residual)`` where ``W [out_features, in_features]`` is unstructured
    sparse (``activation`` and ``residual`` optional).

    Args:
        input: ``[..., in_features]``, any strides. The kernel runs float32 CPU tensors; anything else takes the
            reference (dense weight, ``F.linear``).
        values: ``[nnz]`` kept entries in the order of :class:`~pysparse.formats.UnstructuredSparseWeight` (its
            ``values``), input's dtype and device.
        columns: ``[nnz]`` int32 column of each entry.
        segment_ptr: ``[ceil(in_features / w) * out_features + 1]`` int32, where each (column block, row)
            segment starts; ``w``, the column-block width (128, 256 or 512), follows from its length.
        bias: ``[out_features]`` or None.
        out_features: rows of W.
        check_indices: validate the layout here first (every rule of the format; on CUDA this synchronises). Layers
            built from an ``UnstructuredSparseWeight`` pass False: it was validated when packed or loaded. The CPU
            op always checks what memory safety needs (pointers, column ranges) either way.
        activation: None, "relu", "relu6" or "gelu" (exact, as ``F.gelu``); residual: None or a tensor added before
            the activation, as torch's ``+`` would. On the CPU in float32, when the residual has exactly the
            output's shape and dtype, the kernel applies both to each result before storing it, in training too
            (GELU with gradients excepted: its derivative needs the pre-activation); otherwise torch does after the
            op.
    Returns:
        ``[..., out_features]`` in the input's dtype.
    """
    for name, t in (("input", input), ("values", values), ("columns", columns), ("segment_ptr", segment_ptr)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if isinstance(out_features, bool) or not isinstance(out_features, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"out_features must be an int, got {type(out_features).__name__}")
    if out_features < 0:
        raise ValueError(f"out_features must be >= 0, got {out_features}")
    check_activation(activation)
    check_residual(residual)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension [..., in_features], got a 0-d tensor")
    if check_indices:
        UnstructuredSparseWeight(values, columns, segment_ptr, (int(out_features), int(input.shape[-1])))
    return unstructured_linear_packed(input, values, columns, segment_ptr, bias, int(out_features), activation,
                                      residual)


def unstructured_linear_packed(input: torch.Tensor, values: torch.Tensor, columns: torch.Tensor,
                               segment_ptr: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                               activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`unstructured_linear` for parts an ``UnstructuredSparseWeight`` already validated: no Python-side
    checks (the op still checks its arguments per call; ``activation`` must already be valid)."""
    if input.device.type != "cpu" or input.dtype != torch.float32:
        y = unstructured_linear_reference(input, values, columns, segment_ptr, bias, out_features)
        return torch_epilogue(y, activation, residual)
    if ((activation is not None or residual is not None)
            and (residual is None or fits_output(residual, (*input.shape[:-1], out_features), input))):
        # The epilogue fused into the kernel's stores: no second pass over the output.
        op = torch.ops.pysparse.unstructured_linear_act.default
        if wants_grad(input, values, bias, residual):
            return train_epilogue(op, input, values, columns, segment_ptr, bias, out_features, activation=activation,
                                  residual=residual)
        return call(op, input, values, columns, segment_ptr, bias, out_features, activation, residual)
    y = call(torch.ops.pysparse.unstructured_linear.default, input, values, columns, segment_ptr, bias, out_features)
    return torch_epilogue(y, activation, residual)


def unstructured_linear_reference(input, values, columns, segment_ptr, bias, out_features):
    """Pure-torch ``unstructured_linear``: the weight made dense, then ``F.linear`` (test oracle, and the path for
    devices and dtypes the kernel lacks)."""
    weight = unstructured_to_dense(values, columns, segment_ptr, (out_features, input.shape[-1]))
    return torch.nn.functional.linear(input, weight, bias)


@torch.library.register_fake("pysparse::unstructured_linear")
def _unstructured_linear_fake(input, values, columns, segment_ptr, bias, out_features):
    torch._check(values.dim() == 1, lambda: f"values must be 1-D, got {values.dim()}-D")
    torch._check(values.dtype == input.dtype, lambda: f"values dtype {values.dtype} != input dtype {input.dtype}")
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("pysparse::unstructured_linear_act")
def _unstructured_linear_act_fake(input, values, columns, segment_ptr, bias, out_features, activation=None,
                                  residual=None):
    return _unstructured_linear_fake(input, values, columns, segment_ptr, bias, out_features)


@torch.library.register_fake("pysparse::unstructured_transpose")
def _transpose_fake(columns, segment_ptr, in_features, out_features):
    segments = -(-out_features // 128) * in_features
    return columns.new_empty(columns.shape), columns.new_empty((segments + 1,)), columns.new_empty(columns.shape)


@torch.library.register_fake("pysparse::unstructured_linear_grad_values")
def _grad_values_fake(grad_output, input, columns, segment_ptr):
    return grad_output.new_empty((columns.shape[0],))


def _grad_kernels_apply(grad: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether the backward runs on the kernels: CPU, float32 (``other``: the values or the input)."""
    return grad.device.type == "cpu" and grad.dtype == torch.float32 and other.dtype == torch.float32


# Built once per weight layout (columns, segment_ptr); see LayoutCache.
_TRANSPOSED = LayoutCache(lambda columns, segment_ptr, in_features, out_features:
                          torch.ops.pysparse.unstructured_transpose.default(columns, segment_ptr, in_features,
                                                                            out_features))


def transposed_index(columns: torch.Tensor, segment_ptr: torch.Tensor, in_features: int, out_features: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(columns_t, segment_ptr_t, perm)``: ``W^T [in_features, out_features]`` in the unstructured format, its
    values being ``values[perm]``. Built once per weight layout and cached; under ``torch.compile`` the op is traced
    instead (O(nnz), small next to the products)."""
    return _TRANSPOSED(columns, segment_ptr, in_features, out_features)


def _setup_context(ctx, inputs, output, *extra):
    input, values, columns, segment_ptr, _bias, out_features = inputs
    ctx.shape = (out_features, input.shape[-1])
    # Keep only what the requested gradients need: x for grad_values, the values for grad_input.
    needs_input, needs_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(input if needs_values else None, values if needs_input else None, columns, segment_ptr,
                          *extra)


def dense_grad_input(grad, values, columns, segment_ptr, shape: tuple[int, int]) -> torch.Tensor:
    """``grad @ W`` through the dense ``W [N, K]`` (the backward where the kernels do not apply)."""
    return grad @ unstructured_to_dense(values, columns, segment_ptr, shape)


def dense_grad_values(grad, input, columns, segment_ptr, shape: tuple[int, int]) -> torch.Tensor:
    """``grad^T @ input`` at the kept entries, gathered from the dense ``[N, K]`` product (the backward where the
    kernels do not apply)."""
    n = shape[0]
    rows = entry_segments(segment_ptr, columns.numel()) % max(n, 1)
    return (as_rows(grad).t() @ as_rows(input))[rows, columns.to(torch.int64)]


def _backward(ctx, grad):
    input, values, columns, segment_ptr = ctx.saved_tensors[:4]
    n, k = ctx.shape
    grad_input = grad_values = grad_bias = None
    g, x, rows = grad, input, None
    kernels_input = ctx.needs_input_grad[0] and _grad_kernels_apply(grad, values)
    kernels_values = ctx.needs_input_grad[1] and _grad_kernels_apply(grad, input)
    if kernels_input or kernels_values:  # padding rows carry no gradient (see gradient_rows)
        g, x, rows = gather_gradient_rows(grad, input if kernels_values else None, values if kernels_input else None)
    if ctx.needs_input_grad[0]:
        if kernels_input:
            columns_t, segment_ptr_t, perm = transposed_index(columns, segment_ptr, k, n)
            grad_input = torch.ops.pysparse.unstructured_linear.default(g, values.index_select(0, perm), columns_t,
                                                                        segment_ptr_t, None, k)
            if rows is not None:
                grad_input = rows_to_full(grad_input, rows, as_rows(grad).shape[0])
            grad_input = grad_input.view(*grad.shape[:-1], k)
        else:
            grad_input = dense_grad_input(grad, values, columns, segment_ptr, (n, k))
    if ctx.needs_input_grad[1]:
        if kernels_values:
            grad_values = torch.ops.pysparse.unstructured_linear_grad_values.default(g, x, columns, segment_ptr)
        else:
            grad_values = dense_grad_values(grad, input, columns, segment_ptr, (n, k))
    if ctx.needs_input_grad[4]:
        grad_bias = as_rows(grad).sum(0)
    return grad_input, grad_values, None, None, grad_bias, None


torch.library.register_autograd("pysparse::unstructured_linear", _backward, setup_context=_setup_context)
_act_setup_context, _act_backward = epilogue_autograd(_setup_context, _backward)
torch.library.register_autograd("pysparse::unstructured_linear_act", _act_backward, setup_context=_act_setup_context)
