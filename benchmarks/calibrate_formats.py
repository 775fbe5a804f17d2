"""Throughput of each packed format on this machine's CPU path: the table behind ``sparsify(block_size="auto")``.

For every candidate block size of :data:`pysparse.transforms.format_choice.CANDIDATES` and every density of
:data:`~pysparse.transforms.format_choice.DENSITIES` it packs a random weight of that format (blocks, or single
entries for ``(1, 1)``, exactly that fraction kept), times the layer against nothing else (median of rounds, variants
alternating), and reports GFLOP/s of *stored* entries (2 * M * entries the format holds, zeros inside kept blocks
included), averaged (geometric mean) over the shapes. It prints the table and the Python literal of
``THROUGHPUT[path]``; a path other than the machine's own is measured by forcing it at load:

    python benchmarks/calibrate_formats.py                          # this machine's path
    PYSPARSE_CPU_ISA=avx2 python benchmarks/calibrate_formats.py    # the AVX2 path on an AVX-512 machine

Shapes are ``in->out`` (K x N); M = 1024 tokens (a batch of 8 x 128, where whole models run), 2 threads.
"""
from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch loads libgomp

import torch

from pysparse import ops
from pysparse.bench.environment import cpu_vendor
from pysparse.analysis.timing import alternating_medians
from pysparse.bench.sweep import block_mask
from pysparse.nn import SparseLinear
from pysparse.transforms.format_choice import CANDIDATES, DENSITIES


def random_layer(k: int, n: int, block: tuple[int, int], density: float, gen: torch.Generator) -> SparseLinear:
    mask = block_mask(n, k, block, 1.0 - density, gen)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.mul_(mask)
    return SparseLinear.from_dense(linear, block_size=block, mask=mask).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1536x384", "384x1536"], help="in x out")
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    path = ops.available_backends()["cpu"]
    table: dict[tuple[int, int], list[tuple[float, float]]] = {}
    print(f"# CPU path {path}; torch {torch.__version__}; {args.threads} threads; M = {args.m}; shapes {args.shapes}")
    print(f"{'block':>6} " + " ".join(f"{d:>8}" for d in DENSITIES) + "   GFLOP/s of stored entries")
    for block in CANDIDATES:
        row = []
        for density in DENSITIES:
            rates = []
            for shape in args.shapes:
                k, n = map(int, shape.split("x"))
                layer = random_layer(k, n, block, density, gen)
                x = torch.randn(args.m, k, generator=gen)
                stored = layer.weight.nnz if block == (1, 1) else layer.weight.nnz_blocks * block[0] * block[1]
                with torch.no_grad():
                    seconds = alternating_medians({"layer": lambda: layer(x)}, rounds=args.rounds,
                                                  min_run_time=0.1)["layer"]
                rates.append(2 * args.m * stored / seconds / 1e9)
            row.append((density, round(math.exp(sum(map(math.log, rates)) / len(rates)), 1)))
        table[block] = row
        print(f"{block[0]:>3}x{block[1]:<2} " + " ".join(f"{r:>8.1f}" for _, r in row))
    # a table of this CPU vendor's own (format_choice.cpu_table_key), where the path's table was measured elsewhere
    print(f'"{path}/{cpu_vendor()}": {{  # or "{path}" on the CPU that the path\'s own table is measured on')
    for block, row in table.items():
        print(f"    {block}: {tuple(row)},")
    print("},")


if __name__ == "__main__":
    main()
