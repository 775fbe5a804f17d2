"""GPU benchmark of pysparse's CUDA bsr_linear (bf16) against cuBLAS dense and torch's own BSR path.

For each shape x sparsity x block x M it first checks pysparse against the dense masked reference
(bf16 rel. err < 1e-2), then times three ways of computing y = x @ W^T in the same process:
  dense     F.linear(x, W)                       (cuBLAS)
  torch_bsr F.linear(x, W_bsr) / bsr_dense_mm    (torch's Triton BSR kernels, when they run)
  pysparse  torch.ops.pysparse.bsr_linear
Timing: CUDA events around a captured CUDA graph of R back-to-back calls (launch gaps amortised), median of
several replays (pysparse.bench.timing, shared with `python -m pysparse bench --device cuda`). Each call reads a
different copy of the weight (rotating through enough copies to exceed L2 several times), so small-M numbers
measure HBM streaming, not the L2 cache.
Writes JSON (all numbers) to --json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
import torch.nn.functional as F

from pysparse import ops
from pysparse.bench.sweep import block_mask
from pysparse.bench.timing import copies_for, time_calls
from pysparse.formats import BlockSparseWeight


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,14336x4096", help="NxK list (out x in)")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9,0.95")
    ap.add_argument("--blocks", default="32,64")
    ap.add_argument("--ms", default="1,16,256,4096")
    ap.add_argument("--json", default="bench_cuda.json")
    ap.add_argument("--no-torch-bsr", action="store_true", help="skip torch's BSR path")
    ap.add_argument("--tile-variants", default="64,128,wg128,wg256",
                    help="for M > 16 also time each large-M kernel / token tile forced through PYSPARSE_CUDA_TILE_M "
                         "(mma.sync 64, 128; wgmma wg128, wg256 on sm_90a; empty: only the launcher's own choice)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # torch's "BSR is beta" / Triton meta notices
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    dtype = torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, "
          f"torch {torch.__version__}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        w_full = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.float32).to(dtype) * 0.02
        dense_copies = [w_full] + [w_full.clone() for _ in range(copies_for(w_full.nbytes, l2) - 1)]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
            reps = 20 if m >= 1024 else 100
            t_dense, _ = time_calls([lambda w=w: F.linear(x, w) for w in dense_copies], reps)
            for b in map(int, args.blocks.split(",")):
                for sp in map(float, args.sparsities.split(",")):
                    mask = block_mask(n, k, (b, b), sp, gen)
                    bsw = BlockSparseWeight.from_dense(w_full, (b, b), mask=mask)
                    ref = F.linear(x.float(), (w_full.float() * mask))
                    y = ops.bsr_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, None, n)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    ok = bool(torch.isfinite(y).all()) and err < 1e-2
                    vals = [bsw.values] + [bsw.values.clone() for _ in range(copies_for(bsw.values.nbytes, l2) - 1)]
                    crow, col = bsw.crow_indices, bsw.col_indices
                    calls = [lambda v=v: torch.ops.pysparse.bsr_linear(x, v, crow, col, None, n) for v in vals]
                    t_ps, graphed = time_calls(calls, reps)
                    variants = {}
                    for tile in ([] if m <= 16 or not args.tile_variants else args.tile_variants.split(",")):
                        forced_before = os.environ.get("PYSPARSE_CUDA_TILE_M")
                        os.environ["PYSPARSE_CUDA_TILE_M"] = tile  # read at launch, i.e. when the graph is captured
                        try:
                            y_v = ops.bsr_linear(x, bsw.values, crow, col, None, n)
                            err_v = ((y_v.float() - ref).norm() / ref.norm()).item()
                            ok = ok and bool(torch.isfinite(y_v).all()) and err_v < 1e-2
                            variants[tile], _ = time_calls(calls, reps)
                        finally:
                            if forced_before is None:
                                del os.environ["PYSPARSE_CUDA_TILE_M"]
                            else:
                                os.environ["PYSPARSE_CUDA_TILE_M"] = forced_before
                    t_tb = float("nan")
                    if not args.no_torch_bsr:
                        try:
                            c64, l64 = crow.long(), col.long()
                            bsrs = [torch.sparse_bsr_tensor(c64, l64, v, size=(n, k)) for v in vals]
                            tb_out = F.linear(x, bsrs[0])
                            tb_err = ((tb_out.float() - ref).norm() / ref.norm()).item()
                            if tb_err < 5e-2:
                                t_tb, _ = time_calls([lambda s=s: F.linear(x, s) for s in bsrs],
                                                     max(reps // 5, 4), replays=3)
                        except Exception as exc:  # not every shape/dtype is supported by torch's path
                            print(f"  torch BSR failed at {shape} M={m} b={b} sp={sp}: {type(exc).__name__}: {exc}")
                    useful_flops = 2.0 * m * bsw.nnz_blocks * b * b
                    row = dict(shape=shape, M=m, block=b, sparsity=sp, dense_ms=t_dense, pysparse_ms=t_ps,
                               torch_bsr_ms=t_tb, tile_variant_ms=variants, speedup_vs_dense=t_dense / t_ps,
                               speedup_vs_torch_bsr=t_tb / t_ps, rel_err=err, correct=ok, graphed=graphed,
                               pysparse_tflops=useful_flops / t_ps / 1e9,
                               weight_gbps=(bsw.values.nbytes + col.nbytes + crow.nbytes) / t_ps / 1e6)
                    rows.append(row)
                    print(f"{shape:>10} M={m:<5} b={b:<3} sp={sp:<5} dense {t_dense*1e3:9.1f}us  "
                          f"pysparse {t_ps*1e3:9.1f}us ({row['speedup_vs_dense']:5.2f}x)  "
                          f"torch_bsr {t_tb*1e3:9.1f}us ({row['speedup_vs_torch_bsr']:5.2f}x)  "
                          f"err {err:.1e} {'ok' if ok else 'WRONG'}  {row['pysparse_tflops']:.0f} TFLOP/s "
                          f"{row['weight_gbps']:.0f} GB/s"
                          + "".join(f"  tile{t} {v*1e3:.1f}us" for t, v in variants.items()), flush=True)
                    del vals
        del dense_copies
    with open(args.json, "w") as f:
        json.dump(dict(device=props.name, torch=torch.__version__, rows=rows), f, indent=1)
    print("\nSUMMARY (bf16, speedup of pysparse vs cuBLAS dense / vs torch BSR, same run)")
    print(f"{'shape':>10} {'M':>5} {'blk':>3} " + " ".join(f"{'sp=' + str(s):>13}" for s in args.sparsities.split(",")))
    for shape in args.shapes.split(","):
        for m in map(int, args.ms.split(",")):
            for b in map(int, args.blocks.split(",")):
                cells = [r for r in rows if r["shape"] == shape and r["M"] == m and r["block"] == b]
                txt = " ".join(f"{r['speedup_vs_dense']:5.2f}/{r['speedup_vs_torch_bsr']:6.1f}"
                               + ("" if r["correct"] else "!") for r in cells)
                print(f"{shape:>10} {m:>5} {b:>3} {txt}")
    if any(r["tile_variant_ms"] for r in rows):
        variants = "/".join(args.tile_variants.split(","))
        print(f"\nLARGE-M TOKEN TILES (speedup vs cuBLAS dense with each forced: {variants})")
        for shape in args.shapes.split(","):
            for m in (m for m in map(int, args.ms.split(",")) if m > 16):
                for b in map(int, args.blocks.split(",")):
                    cells = []
                    for r in (r for r in rows if r["shape"] == shape and r["M"] == m and r["block"] == b):
                        v = r["tile_variant_ms"]
                        cells.append("/".join(f"{r['dense_ms'] / v[t]:.2f}" for t in v))
                    print(f"{shape:>10} {m:>5} {b:>3} " + "  ".join(f"{c:>20}" for c in cells))
    bad = [r for r in rows if not r["correct"]]
    print(f"correct at {len(rows) - len(bad)} of {len(rows)} timed points")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
