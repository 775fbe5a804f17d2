"""Unstructured sparse linear (``block_size=(1, 1)``) on the CPU against dense ``F.linear``, in one process.

For each point (shape x sparsity x M) it checks the result against the dense masked weight in float64, then times
dense ``F.linear``, the unstructured kernel (``pysparse.ops.unstructured_linear_packed`` on an
``UnstructuredSparseWeight`` packed at the column-block width the layers choose on this CPU, ``kernel_block_cols``;
where that is not 128, also the same weight at 128, column "x128": its time over the chosen width's) and, for
comparison, the same mask through the BSR kernels with 1x1 blocks, alternating
the variants (``pysparse.analysis.timing.alternating_medians``: the median of several rounds of per-variant
medians), so load from other processes hits all alike. Masks are uniform random at the exact sparsity. It prints the
speedup of each
over dense, the GFLOP/s of useful work (2 * M * kept weights) and, at M = 1, the GB/s of packed weight bytes (values
plus indices; the weights are warm in cache here: a bound, not a DRAM figure).

    python benchmarks/bench_unstructured.py                          # the issue's shapes, 50/70/90%, M 1..1024
    python benchmarks/bench_unstructured.py --shapes 384x1536 --sparsity 0.9 --m 128 --no-bsr
    python benchmarks/bench_unstructured.py --no-bsr --m 1024 --epilogue gelu   # + the fused epilogue against torch's

``--epilogue gelu|residual`` adds, in the same rounds, the layer's fused epilogue (``activation="gelu"``, or a
residual [M, N] added) against the plain op followed by torch's ``F.gelu`` / ``+``; the "epi x" column is the speedup
of the fused call.

Shapes are ``in->out`` (K x N). OpenMP threads spin between calls (OMP_WAIT_POLICY=ACTIVE unless set), as in
bench_cpu_bsr_linear.py: on a shared VM a sleeping thread's wake-up measured the scheduler, not the kernels.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch loads libgomp

import torch
import torch.nn.functional as F

from pysparse import ops
from pysparse.analysis.timing import alternating_medians
from pysparse.bench.environment import cpu_model
from pysparse.formats import BlockSparseWeight, UnstructuredSparseWeight
from pysparse.ops.layer_support import torch_epilogue
from pysparse.ops.unstructured_linear import pack_for_kernel

SHAPES = ["1536x384", "384x1536", "3072x768", "768x3072"]


def random_mask(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    keep = round(n * k * (1.0 - sparsity))
    mask = torch.zeros(n * k, dtype=torch.bool)
    mask[torch.randperm(n * k, generator=gen)[:keep]] = True
    return mask.reshape(n, k)


def bench_point(k: int, n: int, sparsity: float, m: int, args, gen: torch.Generator) -> dict:
    mask = random_mask(n, k, sparsity, gen)
    weight = torch.randn(n, k, generator=gen) * mask
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    uw = pack_for_kernel(weight, mask)
    parts = (uw.values, uw.columns, uw.segment_ptr)
    y = ops.unstructured_linear_packed(x, *parts, bias, n)
    want = F.linear(x.double(), weight.double(), bias.double())
    err = float((y.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
    fns = {"dense": lambda: F.linear(x, weight, bias),
           "unstructured": lambda: ops.unstructured_linear_packed(x, *parts, bias, n)}
    if uw.block_cols != 128:
        narrow = UnstructuredSparseWeight.from_dense(weight, mask)
        fns["width_128"] = lambda: ops.unstructured_linear_packed(x, narrow.values, narrow.columns,
                                                                  narrow.segment_ptr, bias, n)
    if not args.no_bsr:
        bw = BlockSparseWeight.from_dense(weight, block_size=(1, 1), mask=mask)
        vals = ops.kernel_layout(bw.values)
        fns["bsr_1x1"] = lambda: ops.bsr_linear_packed(x, vals, bw.crow_indices, bw.col_indices, bias, n)
    if args.epilogue:
        act = "gelu" if args.epilogue == "gelu" else None
        res = torch.randn(m, n, generator=gen) if args.epilogue == "residual" else None
        fns["fused"] = lambda: ops.unstructured_linear_packed(x, *parts, bias, n, act, res)
        fns["then_torch"] = lambda: torch_epilogue(ops.unstructured_linear_packed(x, *parts, bias, n), act, res)
        with torch.no_grad():
            torch.testing.assert_close(fns["fused"](), fns["then_torch"](), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        t = alternating_medians(fns, rounds=args.rounds, min_run_time=args.min_run_time)
    kept = int(mask.sum())
    return {"t": t, "err": err, "width": uw.block_cols, "gflops": 2 * m * kept / t["unstructured"] / 1e9,
            "gbs": uw.nbytes / t["unstructured"] / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="in x out, e.g. 1536x384")
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--m", nargs="+", type=int, default=[1, 16, 128, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    parser.add_argument("--no-bsr", action="store_true", help="leave out the BSR 1x1 comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epilogue", choices=["gelu", "residual"],
                        help="also time the fused epilogue against the op followed by torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"# {cpu_model()}; pysparse CPU path {ops.available_backends()['cpu']}; torch {torch.__version__}; "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"{'in x out':>10} {'sparsity':>8} {'M':>5} {'dense ms':>9} {'unstr ms':>9} {'unstr x':>8} "
          f"{'bsr1x1 x':>8} {'GFLOP/s':>8} {'GB/s':>6} {'rel err':>8} {'width':>5} {'x128':>5}"
          + (f" {'epi x':>6}" if args.epilogue else ""))
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        for sparsity in args.sparsity:
            for m in args.m:
                r = bench_point(k, n, sparsity, m, args, gen)
                t = r["t"]
                bsr = f"{t['dense'] / t['bsr_1x1']:8.2f}" if "bsr_1x1" in t else f"{'-':>8}"
                gbs = f"{r['gbs']:6.1f}" if m == 1 else f"{'':>6}"
                print(f"{shape:>10} {sparsity:8.2f} {m:5d} {t['dense'] * 1e3:9.3f} {t['unstructured'] * 1e3:9.3f} "
                      f"{t['dense'] / t['unstructured']:8.2f} {bsr} {r['gflops']:8.1f} {gbs} "
                      f"{r['err']:8.1e} {r['width']:5d} "
                      + (f"{t['width_128'] / t['unstructured']:5.2f}" if "width_128" in t else f"{'-':>5}")
                      + (f" {t['then_torch'] / t['fused']:6.2f}" if args.epilogue else ""),
                      flush=True)


if __name__ == "__main__":
    main()
