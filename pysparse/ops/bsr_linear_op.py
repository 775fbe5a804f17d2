"""Block-sparse (BSR) linear: the op ``pysparse::bsr_linear`` (and ``bsr_linear_act``, the same product with a fused
activation / residual epilogue), its Python wrapper, fake kernels for ``torch.compile``, backward, pure-torch
reference, and the memory layout of ``values`` the CPU kernels read.

The compiled library ``pysparse._C`` registers the op schemas and the CPU/CUDA kernels with the dispatcher; this
module adds the Python-side pieces. The backward is registered with ``torch.library.register_autograd``. For
``y = x @ W^T + b`` with ``W [N, K]`` block-sparse (``values [nnz, bh, bw]``, BSR indices):

* ``grad_x = grad_y @ W``. CPU: ``pysparse::bsr_linear_grad_input`` reads the packed weight in place (either
  layout) through a column index of its blocks cached per layout (:mod:`.bsr_linear_grad`); float32, and bfloat16 /
  float16 through widened copies, rounded back once. Elsewhere (CUDA): a ``bsr_linear`` with ``W^T`` in BSR form,
  rebuilt from the saved parts on every backward with torch ops (a sort of ``nnz`` keys and one copy of the kept
  values).
* ``grad_values[b] = grad_y[:, rows(b)]^T @ x[:, cols(b)]`` for the kept blocks only; no dense ``[N, K]`` gradient
  is formed. CPU (float32, 16-bit widened): ``pysparse::bsr_linear_grad_values``, written in the values' own
  layout. Elsewhere: batched GEMMs over gathered block slices, in chunks that bound the temporary memory. Entries of
  a block that overhang a ragged edge get gradient 0 (the kernels never read them).
* ``grad_bias = grad_y`` summed over the leading dimensions.

Everything here is traceable (static shapes, no ``.item()``), so ``torch.compile`` captures the backward too.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import _C  # loading the library registers torch.ops.pysparse.*
from ..formats.bsr import bsr_to_dense, check_bsr_indices
from .bsr_linear_grad import bsr_linear_grad_input, bsr_linear_grad_values, grad_kernels_apply
from .gradient_rows import as_rows, gather_gradient_rows, rows_to_full
from .layer_support import (bsr_int32_indices, call, check_activation, check_residual, epilogue_autograd,
                            fake_with_residual, fits_output, only_bias_wants_grad, torch_epilogue, train_epilogue,
                            wants_grad)

__all__ = ["bsr_linear", "bsr_linear_packed", "bsr_linear_reference", "cpu_reads_transposed", "kernel_layout",
           "is_block_transposed", "bsr_linear_autograd", "transpose_bsr"]


def bsr_linear_packed(input: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                      col_indices: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                      activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`bsr_linear` for parts a ``BlockSparseWeight`` already validated (int32 indices, consistent shapes):
    no Python-side checks; the op still checks what the caller passes per call (input's shape, dtype, device,
    and the residual's).

    ``activation`` (a key of ``ACTIVATIONS``, already validated) and ``residual`` (added as torch's ``+`` would) are
    fused into the CPU kernel when the residual has exactly the output's shape and dtype, in training too (the op's
    backward takes ReLU's and ReLU6's derivative from the saved output), except GELU with gradients, whose
    derivative needs the pre-activation: torch applies it after the op. Elsewhere (CUDA, a residual that broadcasts
    or promotes) torch adds the residual and applies the activation after the op.
    """
    # The CPU kernels add a residual themselves only when it has exactly the output's shape and dtype.
    fusable = input.is_cpu and (residual is None or fits_output(residual, (*input.shape[:-1], out_features), input))
    if fusable and not wants_grad(input, values, bias, residual):
        # The same kernel as bsr_linear, below the autograd layer (`call`): at batch 1 every microsecond of Python
        # is a few percent of the call.
        return call(torch.ops.pysparse.bsr_linear_act.default, input, values, crow_indices, col_indices, bias,
                    out_features, activation, residual)
    if input.is_cpu and input.dtype == torch.float32 and only_bias_wants_grad(bias, input, values):
        # float32 only: in bf16 / fp16 rounding the product before the add would differ from the kernel by an ulp.
        y = call(torch.ops.pysparse.bsr_linear_act.default, input, values, crow_indices, col_indices, None,
                 out_features, None, None) + bias
        return torch_epilogue(y, activation, residual)
    if fusable and (activation is not None or residual is not None):
        return train_epilogue(torch.ops.pysparse.bsr_linear_act.default, input, values, crow_indices, col_indices,
                              bias, out_features, activation=activation, residual=residual)
    y = call(torch.ops.pysparse.bsr_linear.default, input, values, crow_indices, col_indices, bias, out_features)
    return torch_epilogue(y, activation, residual)



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
            On the CPU the op always checks them itself (in C++), whatever this says; the CUDA kernels clamp to
            their buffers either way.
        activation: None, "relu", "relu6" or "gelu" (exact, as ``F.gelu``): applied to the result. On the CPU the
            kernel applies it to each result before storing it (no second pass over the output), in training too
            (the backward takes ReLU's and ReLU6's derivative from the saved output); GELU with gradients (its
            derivative needs the pre-activation) and CUDA run the torch function after the op.
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
    check_activation(activation)
    check_residual(residual)
    crow, col = bsr_int32_indices(values, crow_indices, col_indices)
    if values.dim() == 3 and col.dim() == 1 and col.numel() != values.shape[0]:
        # Before the layout check, which would otherwise blame crow_indices[-1] for col_indices' length.
        raise ValueError(f"col_indices must have one entry per block ({values.shape[0]} blocks in values), "
                         f"got {col.numel()}")
    # On the CPU the op itself runs these checks (C++, the same ValueError messages): here they would add ~15 torch
    # calls, several times the kernel at batch 1.
    if check_indices and values.dim() == 3 and input.dim() >= 1 and not input.is_cpu:
        bh, bw = int(values.shape[1]), int(values.shape[2])
        if bh >= 1 and bw >= 1:
            check_bsr_indices(crow, col, -(-int(out_features) // bh), -(-int(input.shape[-1]) // bw))
    return bsr_linear_packed(input, values, crow, col, bias, int(out_features), activation, residual)


@torch.library.register_fake("pysparse::bsr_linear")
def _bsr_linear_fake(input, values, crow_indices, col_indices, bias, out_features):
    torch._check(values.dim() == 3, lambda: f"values must be 3-D, got {values.dim()}-D")
    torch._check(values.dtype == input.dtype, lambda: f"values dtype {values.dtype} != input dtype {input.dtype}")
    return input.new_empty((*input.shape[:-1], out_features))



@torch.library.register_fake("pysparse::bsr_linear_act")
def _bsr_linear_act_fake(input, values, crow_indices, col_indices, bias, out_features, activation, residual=None):
    return fake_with_residual(_bsr_linear_fake(input, values, crow_indices, col_indices, bias, out_features),
                               residual)


@torch.library.register_fake("pysparse::bsr_column_index")
def _bsr_column_index_fake(crow_indices, col_indices, n_block_cols):
    return crow_indices.new_empty((n_block_cols + 1,)), col_indices.new_empty((col_indices.shape[0], 2))


@torch.library.register_fake("pysparse::bsr_linear_grad_input")
def _bsr_linear_grad_input_fake(grad_output, values, col_ptr, col_entries, in_features):
    torch._check(values.dim() == 3, lambda: f"values must be 3-D, got {values.dim()}-D")
    torch._check(values.dtype == grad_output.dtype,
                 lambda: f"values dtype {values.dtype} != grad_output dtype {grad_output.dtype}")
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


@torch.library.register_fake("pysparse::bsr_linear_grad_values")
def _bsr_linear_grad_values_fake(grad_output, input, values, crow_indices, col_indices):
    torch._check(values.dim() == 3, lambda: f"values must be 3-D, got {values.dim()}-D")
    # The kernel writes the gradient in the values' layout (AccumulateGrad then takes it without a copy).
    return torch.empty_like(values) if is_block_transposed(values) else values.new_empty(values.shape)


@torch.library.register_fake("pysparse::bsr_linear_grad_values_bias")
def _bsr_linear_grad_values_bias_fake(grad_output, input, values, crow_indices, col_indices):
    grad_values = _bsr_linear_grad_values_fake(grad_output, input, values, crow_indices, col_indices)
    return grad_values, grad_output.new_empty((grad_output.shape[-1],))


def bsr_linear_reference(input, values, crow_indices, col_indices, bias, out_features):
    """Pure-torch ``bsr_linear``: densify W and call ``F.linear`` (the test oracle and a portable fallback)."""
    weight = bsr_to_dense(values, crow_indices, col_indices, (out_features, input.shape[-1]))
    return torch.nn.functional.linear(input, weight, bias)



_CPU_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def cpu_reads_transposed(bh: int, bw: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether this machine's CPU kernels read ``(bh, bw)`` blocks of ``dtype`` (float32, bfloat16 or float16)
    transposed at every batch size (the broadcast kernel's layout: on AVX2 for bh a multiple of 16, on AVX-512 for
    float32 with bh a multiple of 32, where the broadcast kernel runs up to 16 tokens and the outer-product kernel
    reads the same layout above). ``bsr_linear`` then takes ``values`` laid out
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



# ---- backward ---------------------------------------------------------------------------------------------------
# Upper bound on the gathered temporaries of one grad_values chunk (grad_y and x slices).
_GATHER_BYTES = 64 << 20


def _block_rows(crow_indices: torch.Tensor, nnz: int) -> torch.Tensor:
    """Block row of each stored block (int64), from crow_indices without data-dependent shapes."""
    crow = crow_indices.to(torch.int64)
    blocks = torch.arange(nnz, device=crow.device)
    return torch.searchsorted(crow[1:], blocks, right=True)


def transpose_bsr(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, n_block_cols: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BSR parts of ``W^T`` from those of ``W``: ``(values [nnz, bw, bh], crow_indices, col_indices)``, int32.

    ``n_block_cols`` is the number of block columns of ``W`` (block rows of ``W^T``).
    """
    nnz = values.shape[0]
    n_block_rows = crow_indices.shape[0] - 1
    rows = _block_rows(crow_indices, nnz)
    cols = col_indices.to(torch.int64)
    # Sort blocks by (column, row): the row-major order of W^T. Keys are unique, so any sort is exact.
    perm = torch.argsort(cols * n_block_rows + rows)
    values_t = values.index_select(0, perm).transpose(1, 2).contiguous()
    counts = torch.zeros(n_block_cols, dtype=torch.int64, device=cols.device)
    counts.index_add_(0, cols, torch.ones_like(cols))
    crow_t = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    col_t = rows.index_select(0, perm).to(torch.int32)
    return values_t, crow_t, col_t


def _values_grad(grad2: torch.Tensor, x2: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                 block_size: tuple[int, int], nnz: int) -> torch.Tensor:
    """``[nnz, bh, bw]``: for each kept block, ``grad2[:, block rows]^T @ x2[:, block cols]``."""
    bh, bw = block_size
    m, n = grad2.shape
    k = x2.shape[1]
    n_br, n_bc = crow_indices.shape[0] - 1, -(-k // bw)
    if nnz == 0 or m == 0:
        return grad2.new_zeros(nnz, bh, bw)
    # Zero-pad to whole blocks, then lay out block-major so each block's slice is one contiguous gather.
    g_blocks = F.pad(grad2, (0, n_br * bh - n)).reshape(m, n_br, bh).permute(1, 2, 0).contiguous()  # [n_br,bh,m]
    x_blocks = F.pad(x2, (0, n_bc * bw - k)).reshape(m, n_bc, bw).transpose(0, 1).contiguous()      # [n_bc,m,bw]
    rows = _block_rows(crow_indices, nnz)
    cols = col_indices.to(torch.int64)
    chunk = max(1, _GATHER_BYTES // (m * (bh + bw) * grad2.element_size()))
    parts = [torch.bmm(g_blocks.index_select(0, rows[s:s + chunk]), x_blocks.index_select(0, cols[s:s + chunk]))
             for s in range(0, nnz, chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def bsr_linear_autograd(linear, cpu_kernels: bool = False):
    """``(setup_context, backward)`` for an op with ``bsr_linear``'s signature.

    ``linear(input, values, crow_indices, col_indices, bias, out_features)`` computes the ``grad_y @ W`` product
    (with ``W^T`` passed as BSR) where the backward kernels do not apply: the registered backward uses
    ``torch.ops.pysparse.bsr_linear`` itself; tests pass ``pysparse.ops.bsr_linear_reference`` to check the same
    formulas in float64, which the kernels lack. ``cpu_kernels``: CPU gradients (float32; 16-bit widened) come from
    the backward kernels (``bsr_linear_grad_input`` / ``bsr_linear_grad_values``) instead. ``setup_context`` saves its
    ``extra`` tensors after its own (see :func:`~.layer_support.epilogue_autograd`).
    """

    def setup_context(ctx, inputs, output, *extra):
        input, values, crow_indices, col_indices, bias, out_features = inputs
        ctx.in_features = input.shape[-1]
        ctx.out_features = out_features
        ctx.block_size = (values.shape[1], values.shape[2])
        ctx.nnz = values.shape[0]
        # Keep only what the requested gradients need: x for grad_values, the values for grad_input (and, on the
        # kernels, for grad_values' layout).
        needs_input, needs_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep_values = needs_input or (cpu_kernels and needs_values)
        ctx.save_for_backward(input if needs_values else None, values if keep_values else None,
                              crow_indices, col_indices, *extra)

    def backward(ctx, grad):
        input, values, crow_indices, col_indices = ctx.saved_tensors[:4]
        grad_input = grad_values = grad_bias = None
        k, n = ctx.in_features, ctx.out_features
        if cpu_kernels and values is not None and grad_kernels_apply(grad, values):
            lead = grad.shape[:-1]
            # Padding rows carry no gradient (see gradient_rows).
            g, x, rows = gather_gradient_rows(grad, input if ctx.needs_input_grad[1] else None,
                                              values if ctx.needs_input_grad[0] else None)
            if ctx.needs_input_grad[0]:
                grad_input = bsr_linear_grad_input(g, values, crow_indices, col_indices, k)
                if rows is not None:
                    grad_input = rows_to_full(grad_input, rows, as_rows(grad).shape[0])
                grad_input = grad_input.view(*lead, k)
            if ctx.needs_input_grad[1] and ctx.needs_input_grad[4]:  # the bias gradient from the same pass
                grad_values, grad_bias = bsr_linear_grad_values(g, x, values, crow_indices, col_indices,
                                                                with_bias=True)
            elif ctx.needs_input_grad[1]:
                grad_values = bsr_linear_grad_values(g, x, values, crow_indices, col_indices)
        elif ctx.needs_input_grad[0]:
            n_block_cols = -(-k // ctx.block_size[1])
            values_t, crow_t, col_t = transpose_bsr(values, crow_indices, col_indices, n_block_cols)
            grad_input = linear(grad, values_t, crow_t, col_t, None, k)
        if ctx.needs_input_grad[1] and grad_values is None:
            grad_values = _values_grad(grad.reshape(-1, n), input.reshape(-1, k), crow_indices, col_indices,
                                       ctx.block_size, ctx.nnz)
        if ctx.needs_input_grad[4] and grad_bias is None:
            grad_bias = grad.reshape(-1, n).sum(0)
        return grad_input, grad_values, None, None, grad_bias, None

    return setup_context, backward


_setup_context, _backward = bsr_linear_autograd(torch.ops.pysparse.bsr_linear.default, cpu_kernels=True)
torch.library.register_autograd("pysparse::bsr_linear", _backward, setup_context=_setup_context)
_act_setup_context, _act_backward = epilogue_autograd(_setup_context, _backward)
torch.library.register_autograd("pysparse::bsr_linear_act", _act_backward, setup_context=_act_setup_context)
