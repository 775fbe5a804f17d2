"""Sweep of pysparse's CPU ``bsr_linear`` against dense ``F.linear`` and torch ``sparse_bsr``, in one process.

For every point (shape x block x sparsity x M) it checks pysparse's result against the dense masked weight,
then times the three implementations interleaved (``pysparse.analysis.alternating_medians``: 15 rounds, each
implementation's median per call in every round, the median of the rounds), so load from other processes hits all
three alike. Masks come from ``pysparse.bench.sweep.block_mask``, errors from ``pysparse.bench.check.rel_err``. It
prints, per point, the speedup over dense and over torch ``sparse_bsr``
beside the ideal 1/density, and the GFLOP/s of useful work (2 * M * kept weights); at M <= 4 also the GB/s of
kept weight bytes (values + indices), the bound in that regime.

    python benchmarks/bench_cpu_bsr_linear.py                 # the full sweep of issue 7 (long: ~30-60 min)
    python benchmarks/bench_cpu_bsr_linear.py --targets       # the issue's target cases only (~2 min)
    python benchmarks/bench_cpu_bsr_linear.py --shapes 768x3072 --blocks 32 --sparsity 0.9 --m 1 128
    python benchmarks/bench_cpu_bsr_linear.py --targets --threads 1 --dtype bfloat16 --no-torch-bsr
    python benchmarks/bench_cpu_bsr_linear.py --targets --no-torch-bsr --row-major   # + row-major weight layout

Shapes are ``in->out`` (K x N). Run it on an idle machine; the load average is printed with the table.
OpenMP threads spin between calls (OMP_WAIT_POLICY=ACTIVE unless the environment says otherwise) for every
implementation alike: on a busy shared VM, libgomp's default of sleeping idle threads made a woken thread wait
~30 ms for a CPU, which measured the scheduler, not the kernels.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch loads libgomp

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pysparse  # noqa: E402
from pysparse.analysis.timing import alternating_medians  # noqa: E402
from pysparse.bench.check import LAYER_TOLERANCE, rel_err  # noqa: E402
from pysparse.bench.options import DTYPES  # noqa: E402
from pysparse.bench.sweep import block_mask  # noqa: E402
from pysparse.formats import BlockSparseWeight  # noqa: E402
from pysparse.ops import bsr_linear, kernel_layout  # noqa: E402

SHAPES = ((768, 3072), (3072, 768), (4096, 4096))
BLOCKS = (16, 32, 64)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
MS = (1, 8, 32, 128, 512)
# Issue 7's target cases: (K, N, block, sparsity, M).
TARGETS = (
    (768, 3072, 32, 0.9, 128),
    (768, 3072, 32, 0.9, 1),
    (768, 3072, 32, 0.5, 32),
    (768, 3072, 32, 0.5, 128),
    (768, 3072, 16, 0.9, 128),
    (768, 3072, 64, 0.9, 128),
)
ROUNDS = 15  # timing rounds per point; --min-time is split between them


def block_sparse_weight(n: int, k: int, block: int, sparsity: float, dtype=torch.float32, seed: int = 0):
    """Dense masked weight [n, k] with exactly total - round(sparsity * total) random (block x block) blocks kept
    (``block_mask``), and its packed form."""
    gen = torch.Generator().manual_seed(seed)
    mask = block_mask(n, k, (block, block), sparsity, gen)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5 * mask).to(dtype)
    return weight, BlockSparseWeight.from_dense(weight, block_size=(block, block), mask=mask)


def measure(k: int, n: int, block: int, sparsity: float, m: int, dtype=torch.float32, torch_bsr: bool = True,
            min_time: float = 0.4, weights=None, row_major: bool = False) -> dict:
    """Times one point; returns a row of the table (raises if pysparse's result is wrong). pysparse gets its weight
    in the layout SparseLinear keeps (``ops.kernel_layout``); ``row_major`` also times it on torch's row-major
    values (the kernels then transpose per call, or take another kernel), in the same rounds."""
    weight, packed = weights or block_sparse_weight(n, k, block, sparsity, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    v, crow, col = kernel_layout(packed.values), packed.crow_indices, packed.col_indices
    fns = {
        "pysparse": lambda: bsr_linear(x, v, crow, col, bias, n, check_indices=False),
        "dense": lambda: F.linear(x, weight, bias),
    }
    ref = F.linear(x.double(), weight.double(), bias.double())
    if row_major:
        v_rows = packed.values.contiguous()
        fns["row_major"] = lambda: bsr_linear(x, v_rows, crow, col, bias, n, check_indices=False)
        assert rel_err(fns["row_major"](), ref) < LAYER_TOLERANCE[dtype]
    err = rel_err(fns["pysparse"](), ref)
    if not err < LAYER_TOLERANCE[dtype]:
        raise AssertionError(f"pysparse result is wrong for {k}->{n} block {block} sparsity {sparsity} M={m}: "
                             f"rel err {err:.3g}")
    if torch_bsr:
        w_bsr = weight.to_sparse_bsr((block, block))
        fns["torch_bsr"] = lambda: F.linear(x, w_bsr, bias)
        err_bsr = rel_err(fns["torch_bsr"](), ref)
        if err_bsr > (1e-4 if dtype == torch.float32 else 1e-2):
            raise AssertionError(f"torch sparse_bsr result is wrong: rel err {err_bsr:.3g}")
    t = alternating_medians(fns, rounds=ROUNDS, min_run_time=min_time / ROUNDS)
    nnz = v.shape[0]
    useful_flops = 2.0 * m * nnz * block * block
    kept_bytes = v.numel() * v.element_size() + (crow.numel() + col.numel()) * 4
    row = dict(shape=f"{k}->{n}", block=block, sparsity=sparsity, m=m, dtype=str(dtype).replace("torch.", ""),
               ideal=n * k / (nnz * block * block), t_pysparse_us=t["pysparse"] * 1e6, t_dense_us=t["dense"] * 1e6,
               vs_dense=t["dense"] / t["pysparse"], gflops=useful_flops / t["pysparse"] / 1e9,
               weight_gbs=kept_bytes / t["pysparse"] / 1e9, err=err)
    if torch_bsr:
        row["t_torch_bsr_us"] = t["torch_bsr"] * 1e6
        row["vs_torch_bsr"] = t["torch_bsr"] / t["pysparse"]
    if row_major:
        row["t_row_major_us"] = t["row_major"] * 1e6
        row["layout_gain"] = t["row_major"] / t["pysparse"]
    return row


def format_table(rows: list) -> str:
    head = ("| shape | block | sparsity | M | ideal | pysparse us | dense us | vs dense | torch_bsr us | vs torch_bsr "
            "| GFLOP/s useful | GB/s kept weights |")
    layouts = any("layout_gain" in r for r in rows)
    if layouts:
        head += " row-major values us | layout gain |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        bsr_t = f"{r['t_torch_bsr_us']:.0f}" if "t_torch_bsr_us" in r else "-"
        bsr_x = f"{r['vs_torch_bsr']:.1f}x" if "vs_torch_bsr" in r else "-"
        gbs = f"{r['weight_gbs']:.1f}" if r["m"] <= 4 else ""
        lines.append(f"| {r['shape']} | {r['block']}x{r['block']} | {r['sparsity']:.2f} | {r['m']} | "
                     f"{r['ideal']:.1f}x | {r['t_pysparse_us']:.1f} | {r['t_dense_us']:.1f} | {r['vs_dense']:.1f}x | "
                     f"{bsr_t} | {bsr_x} | {r['gflops']:.1f} | {gbs} |"
                     + (f" {r['t_row_major_us']:.1f} | {r['layout_gain']:.2f}x |" if layouts else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", action="store_true", help="only issue 7's target cases")
    ap.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (in x out)")
    ap.add_argument("--blocks", nargs="*", type=int, default=list(BLOCKS))
    ap.add_argument("--sparsity", nargs="*", type=float, default=list(SPARSITIES))
    ap.add_argument("--m", nargs="*", type=int, default=list(MS))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-torch-bsr", action="store_true", help="skip torch sparse_bsr (slow at large M)")
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timing per implementation and point")
    ap.add_argument("--row-major", action="store_true",
                    help="also time pysparse on row-major values (the layout before v14), in the same rounds")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.targets:
        points = list(TARGETS)
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
        points = [(k, n, b, s, m) for (k, n) in shapes for b in args.blocks for s in args.sparsity for m in args.m]
    print(f"# pysparse {pysparse.__version__} CPU path {pysparse.ops.available_backends()['cpu']}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"dtype {args.dtype}, "
          f"load average before {os.getloadavg()[0]:.2f}")
    rows, weights_key, weights = [], None, None
    for k, n, b, s, m in points:
        if (k, n, b, s) != weights_key:
            weights_key, weights = (k, n, b, s), block_sparse_weight(n, k, b, s, dtype)
        row = measure(k, n, b, s, m, dtype, torch_bsr=not args.no_torch_bsr, min_time=args.min_time,
                      weights=weights, row_major=args.row_major)
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
    print(f"\n# load average after {os.getloadavg()[0]:.2f}\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
