"""The layer sweep: ``y = x @ W^T + b`` for every shape x batch size x block size x sparsity, three ways.

dense       ``F.linear(x, W, b)`` with the masked dense weight (PyTorch's dense GEMM: MKL/oneDNN, cuBLAS)
pysparse    ``pysparse.ops.bsr_linear`` on the packed weight, as :class:`pysparse.nn.SparseLinear` calls it
torch       ``F.linear(x, W_bsr, b)`` with ``W`` as a ``torch.sparse_bsr`` tensor (torch's own sparse path)
deepsparse  with ``--compare deepsparse``: an ``nn.Linear`` holding the masked weight, exported to ONNX and run by
            DeepSparse (see :mod:`pysparse.bench.deepsparse_compare`)

Each point first checks pysparse (and torch's path) against the dense masked reference computed in float64, and
is timed only when the result is right. The mask keeps exactly ``total - round(sparsity * total)`` blocks at
random positions, so the density is what was asked for (up to rounding on small grids).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..formats import BlockSparseWeight
from .check import LAYER_TOLERANCE, rel_err
from .timing import alternate, copies_for, l2_bytes, median_ms


@dataclass(frozen=True)
class LayerCase:
    n: int                      # out_features
    k: int                      # in_features
    m: int                      # rows of x (batch size x tokens)
    block: tuple[int, int]      # (bh, bw)
    sparsity: float             # fraction of blocks dropped


def cases(shapes, batch_sizes, blocks, sparsities) -> list[LayerCase]:
    """Every combination, in the order the sweep runs them (one weight per shape, one input per batch size)."""
    return [LayerCase(n, k, m, block, sp) for n, k in shapes for m in batch_sizes for block in blocks
            for sp in sparsities]


def block_mask(n, k, block, sparsity, gen):
    """``[n, k]`` keep-mask of ``block`` tiles (ragged at the edges), exactly ``total - round(sparsity * total)``
    tiles kept at random, on ``gen``'s device."""
    bh, bw = block
    nbr, nbc = -(-n // bh), -(-k // bw)
    total = nbr * nbc
    keep = total - round(sparsity * total)
    order = torch.randperm(total, generator=gen, device=gen.device)[:keep]
    grid = torch.zeros(total, dtype=torch.bool, device=gen.device)
    grid[order] = True
    grid = grid.view(nbr, nbc)
    return grid.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]


def _torch_sparse(bsw: BlockSparseWeight, copies: list[torch.Tensor]) -> tuple[list[torch.Tensor] | None, str]:
    """torch.sparse_bsr weights sharing the packed indices (one per values copy), or None and why not."""
    n, k = bsw.shape
    bh, bw = bsw.block_size
    if n % bh or k % bw:
        return None, f"torch.sparse_bsr cannot hold a {n}x{k} weight in {bh}x{bw} blocks (not a multiple)"
    crow, col = bsw.crow_indices.long(), bsw.col_indices.long()
    return [torch.sparse_bsr_tensor(crow, col, v, size=(n, k), check_invariants=False) for v in copies], ""


def run_case(case: LayerCase, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, *, gen: torch.Generator,
             min_run_time: float, rounds: int = 1, torch_sparse: bool = True, deepsparse=None) -> dict:
    """Check and time one point; ``weight [n, k]``, ``bias [n]`` and ``x [m, k]`` are dense random inputs;
    ``deepsparse``: a :class:`~pysparse.bench.deepsparse_compare.DeepSparse` to compare with, or None."""
    device, dtype = x.device.type, x.dtype
    n, k = weight.shape
    mask = block_mask(n, k, case.block, case.sparsity, gen)
    bsw = BlockSparseWeight.from_dense(weight, case.block, mask=mask)
    dense_w = weight * mask
    want = F.linear(x.double(), dense_w.double(), bias.double())
    tol = LAYER_TOLERANCE[dtype]
    crow, col = bsw.crow_indices, bsw.col_indices
    # pysparse reads its weights in the layout SparseLinear keeps them in (ops.kernel_layout); torch's, row-major.
    kernel_values = ops.kernel_layout(bsw.values)
    err = rel_err(ops.bsr_linear(x, kernel_values, crow, col, bias, n), want)
    row = dict(mode="layer", shape=f"{n}x{k}", n=n, k=k, m=case.m, block=f"{case.block[0]}x{case.block[1]}",
               sparsity=case.sparsity, density=bsw.density, dtype=str(dtype).removeprefix("torch."), device=device,
               rel_err=err, tolerance=tol, correct=err < tol, weight_bytes=dense_w.nbytes, packed_bytes=bsw.nbytes,
               dense_ms=None, pysparse_ms=None, torch_sparse_ms=None, torch_sparse_rel_err=None, torch_sparse_note="")

    # On CUDA each call reads another copy of the weight, so small-M numbers are not served from L2.
    n_copies = (lambda nbytes: copies_for(nbytes, l2_bytes())) if device == "cuda" else (lambda nbytes: 1)
    dense_ws = [dense_w] + [dense_w.clone() for _ in range(n_copies(dense_w.nbytes) - 1)]
    values = [bsw.values] + [bsw.values.clone() for _ in range(n_copies(bsw.values.nbytes) - 1)]
    laid_out = [kernel_values] + [kernel_values.clone() for _ in values[1:]]
    fns = {"dense": [lambda w=w: F.linear(x, w, bias) for w in dense_ws],
           "pysparse": [lambda v=v: ops.bsr_linear(x, v, crow, col, bias, n, check_indices=False) for v in laid_out]}
    if not row["correct"]:
        fns.pop("pysparse")  # a wrong result is not timed
    if torch_sparse:
        sparse_ws, row["torch_sparse_note"] = _torch_sparse(bsw, values)
        if sparse_ws is not None:
            try:
                terr = rel_err(F.linear(x, sparse_ws[0], bias), want)
            except (RuntimeError, NotImplementedError) as exc:  # dtypes/devices torch's sparse path lacks
                row["torch_sparse_note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            else:
                row["torch_sparse_rel_err"] = terr
                if terr < tol:
                    fns["torch_sparse"] = [lambda s=s: F.linear(x, s, bias) for s in sparse_ws]
                else:
                    row["torch_sparse_note"] = f"wrong result (rel. err {terr:.1e} >= {tol:g}), not timed"
    else:
        row["torch_sparse_note"] = "skipped (--no-torch-sparse)"

    reps = 20 if case.m >= 1024 else 100
    timers = {name: (lambda calls=calls, r=max(reps // 5, 4) if name == "torch_sparse" else reps:
                     median_ms(calls, device, min_run_time=min_run_time, reps=r))
              for name, calls in fns.items()}
    if deepsparse is not None:
        linear = nn.Linear(k, n, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dense_w)
            linear.bias.copy_(bias)
        fields, ds_timer = deepsparse.measure(linear.eval(), (x,), want, tolerance=tol, min_run_time=min_run_time)
        row.update(fields)
        if ds_timer is not None:
            timers["deepsparse"] = ds_timer
    for name, ms in alternate(timers, rounds).items():
        row[f"{name}_ms"] = ms
    add_ratios(row)
    return row


def add_ratios(row: dict) -> None:
    """Speedups over dense measured in the same run, and the ideal ``1 / density`` (None where undefined)."""
    dense = row["dense_ms"]

    def ratio(t):
        return dense / t if dense and t and math.isfinite(dense / t) else None

    row["ratio_vs_dense"] = ratio(row["pysparse_ms"])
    row["torch_sparse_ratio_vs_dense"] = ratio(row["torch_sparse_ms"])
    if "deepsparse_ms" in row:
        row["deepsparse_ratio_vs_dense"] = ratio(row["deepsparse_ms"])
    row["ideal"] = 1.0 / row["density"] if row["density"] else None


def run_sweep(case_list: list[LayerCase], *, dtype=torch.float32, device: str = "cpu", min_run_time: float = 0.2,
              rounds: int = 1, torch_sparse: bool = True, seed: int = 0, progress=None, deepsparse=None) -> list[dict]:
    """Run ``case_list`` and return one row per case (see :func:`run_case`); ``progress`` wraps the iteration
    (e.g. ``tqdm``)."""
    gen = torch.Generator(device).manual_seed(seed)
    rows, inputs = [], {}
    with warnings.catch_warnings():
        # torch's "sparse BSR support is in beta" notices: one per tensor, nothing to act on here.
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta.*")
        for case in (progress(case_list) if progress else case_list):
            shape = (case.n, case.k)
            if shape not in inputs:  # one weight per shape: the sparsities and blocks differ only in the mask
                inputs = {shape: (torch.randn(case.n, case.k, generator=gen, device=device).to(dtype) * 0.05,
                                  torch.randn(case.n, generator=gen, device=device).to(dtype), {})}
            weight, bias, xs = inputs[shape]
            if case.m not in xs:
                xs[case.m] = torch.randn(case.m, case.k, generator=gen, device=device).to(dtype)
            rows.append(run_case(case, weight, bias, xs[case.m], gen=gen, min_run_time=min_run_time, rounds=rounds,
                                 torch_sparse=torch_sparse, deepsparse=deepsparse))
    return rows
