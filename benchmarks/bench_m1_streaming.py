"""Batch 1 (M = 1) with the weights read from memory: every packed format against dense ``F.linear`` and against the
machine's copy bandwidth, in one process.

At M = 1 a layer does two multiply-adds per weight it reads, so its time is the time to stream its weights. Warm in
cache (``bench_unstructured.py``, ``bench_cpu_bsr_linear.py``) that measures the cache; here each variant rotates
through copies of its weight (dense, or packed values plus indices) that together exceed the last-level cache
``--llc-factor`` times, so every call reads its weight from DRAM, as a model too large for the cache does. Each
point is checked against the dense masked weight in float64 first; the variants alternate in every round and each
takes the median over rounds of its time per call. It prints, per point, the speedup over dense, the GB/s of packed
bytes read, and that as a share of the copy bandwidth: ``Tensor.copy_`` of a 512 MiB buffer, bytes read plus bytes
written per second (STREAM's "copy" count), measured in the same process.

    python benchmarks/bench_m1_streaming.py                        # the issue's shapes, every format, 90%
    python benchmarks/bench_m1_streaming.py --shapes 768x3072 --formats 1x1 32x32 --sparsity 0.7 0.9

Shapes are ``in->out`` (K x N). Formats are ``BHxBW`` blocks; ``1x1`` is the unstructured format and kernel.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch loads libgomp (see bench_cpu_bsr_linear.py)

import torch
import torch.nn.functional as F

from pysparse import ops
from pysparse.analysis.timing import median_seconds
from pysparse.bench.environment import cpu_model
from pysparse.bench.sweep import block_mask
from pysparse.formats import BlockSparseWeight
from pysparse.ops.unstructured_linear import pack_for_kernel

SHAPES = ["1536x384", "384x1536", "3072x768", "768x3072"]
FORMATS = ["1x1", "16x1", "8x1", "1x16", "4x4", "8x8", "16x16", "32x32"]


def llc_bytes() -> int:
    """The last-level cache's size as Linux reports it for CPU 0 (64 MiB where it does not)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 64 * 2**20


def copy_bandwidth() -> float:
    """Bytes read plus written per second by ``copy_`` between two 512 MiB buffers (median over repeated copies)."""
    src = torch.ones(2**27)
    return 2 * src.nbytes / median_seconds(torch.empty_like(src).copy_, src, min_run_time=1.0)


def rotation(make_copy, nbytes: int, total_bytes: int) -> list:
    """Enough copies (at least 2) of an operand of ``nbytes`` that together they take ``total_bytes``."""
    return [make_copy() for _ in range(max(2, -(-total_bytes // max(nbytes, 1))))]


def seconds_per_call(fn, copies: list) -> float:
    """Time of one call, each call of a pass over ``copies`` reading the next copy."""
    t0 = time.perf_counter()
    for c in copies:
        fn(c)
    return (time.perf_counter() - t0) / len(copies)


def packed_variant(weight: torch.Tensor, mask: torch.Tensor, block: tuple[int, int], bias: torch.Tensor):
    """(call(copy, x), make_copy, packed bytes) for the format pysparse runs ``block`` with."""
    n = weight.shape[0]
    if block == (1, 1):
        uw = pack_for_kernel(weight, mask)  # at the column-block width the layers take on this CPU

        def copy_unstructured():
            return uw.values.clone(), uw.columns.clone(), uw.segment_ptr.clone()

        return (lambda c, x: ops.unstructured_linear_packed(x, *c, bias, n)), copy_unstructured, uw.nbytes
    bw = BlockSparseWeight.from_dense(weight, block_size=block, mask=mask)
    values = ops.kernel_layout(bw.values)

    def copy_blocks():
        return values.clone(), bw.crow_indices.clone(), bw.col_indices.clone()  # clone keeps the block layout

    return (lambda c, x: ops.bsr_linear_packed(x, *c, bias, n)), copy_blocks, bw.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="in x out, e.g. 1536x384")
    parser.add_argument("--formats", nargs="+", default=FORMATS, help="block sizes BHxBW; 1x1 is unstructured")
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.9])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--llc-factor", type=float, default=2.0,
                        help="each variant's copies together take this many times the last-level cache")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    llc = llc_bytes()
    total = int(args.llc_factor * llc)
    copy_bw = copy_bandwidth()
    print(f"# {cpu_model()}; pysparse CPU path {ops.available_backends()['cpu']}; torch {torch.__version__}; "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"# last-level cache {llc / 2**20:.0f} MiB; each variant rotates through {total / 2**20:.0f} MiB of copies; "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)")
    print("| shape | format | sparsity | dense us | dense GB/s | pysparse us | vs dense | packed MB | GB/s | "
          "of copy bw | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for shape in args.shapes:
            k, n = (int(v) for v in shape.lower().split("x"))
            weight = torch.randn(n, k, generator=gen)
            bias = torch.randn(n, generator=gen)
            x = torch.randn(1, k, generator=gen)
            dense_copies = rotation(weight.clone, weight.nbytes, total)
            for fmt in args.formats:
                block = tuple(int(v) for v in fmt.lower().split("x"))
                for sparsity in args.sparsity:
                    mask = block_mask(n, k, block, sparsity, gen)
                    masked = weight * mask
                    call, make_copy, nbytes = packed_variant(masked, mask, block, bias)
                    copies = rotation(make_copy, nbytes, total)
                    want = F.linear(x.double(), masked.double(), bias.double())
                    got = call(copies[0], x)
                    err = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
                    times = {"dense": [], "sparse": []}
                    for _ in range(args.rounds):
                        times["dense"].append(seconds_per_call(lambda w: F.linear(x, w, bias), dense_copies))
                        times["sparse"].append(seconds_per_call(lambda c: call(c, x), copies))
                    t_dense, t_sparse = (statistics.median(times[v]) for v in ("dense", "sparse"))
                    gbs = nbytes / t_sparse
                    print(f"| {k}->{n} | {fmt} | {sparsity:.2f} | {t_dense * 1e6:.1f} | "
                          f"{weight.nbytes / t_dense / 1e9:.1f} | {t_sparse * 1e6:.1f} | {t_dense / t_sparse:.2f}x | "
                          f"{nbytes / 1e6:.2f} | {gbs / 1e9:.1f} | {gbs / copy_bw:.0%} | {err:.1e} |", flush=True)
                    del copies


if __name__ == "__main__":
    main()
