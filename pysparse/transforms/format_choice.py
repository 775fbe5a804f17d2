"""``sparsify(block_size="auto")``: per layer, the packed format that its zeros allow and that should run fastest.

Every candidate holds the weight exactly: a block format keeps each block with a nonzero in it, zeros inside
included; single entries (``(1, 1)``, linear layers on the CPU) have the unstructured format. What differs is how
many entries each stores and how fast its kernel multiplies them, so a candidate's estimated time is its stored
entries over its throughput. The throughputs are a table per CPU kernel path (``pysparse.ops.available_backends()``)
and, where its cores differ enough to have their own, per CPU vendor (``cpu_table_key``): GFLOP/s of stored entries
at M = 1024 tokens on 2 threads, measured by ``benchmarks/calibrate_formats.py`` and interpolated over the stored
density. The same weights get the same format on every machine of a table, and two processes never disagree. Only
ratios between formats matter. ``sparsify(autotune=True)`` then times the chosen layer against the dense one on the
real input.
"""
from __future__ import annotations

import torch

from ..formats.block_sparse import kept_blocks

__all__ = ["CANDIDATES", "DENSITIES", "THROUGHPUT", "choose_block_size", "cpu_table_key", "stored_entries"]

CANDIDATES = ((1, 1), (16, 1), (8, 1), (1, 16), (4, 4), (8, 8), (16, 16), (32, 32))
DENSITIES = (0.1, 0.3, 0.5, 1.0)

# GFLOP/s of stored entries, (density, rate) pairs, from benchmarks/calibrate_formats.py --rounds 2 (BENCHMARKS.md):
# avx512 and generic on an AMD EPYC (Zen 4), 2026-12-06, each path forced with PYSPARSE_CPU_ISA; the others below.
THROUGHPUT: dict[str, dict[tuple[int, int], tuple[tuple[float, float], ...]]] = {
    # an Intel Xeon (Sapphire Rapids class, lscpu model 167), 2026-12-06, --rounds 2: two 512-bit FMA ports where
    # Zen 4 has one, so the formats whose kernels reuse each load of x (blocks) gain most; single entries and narrow
    # vectors lose ground at low density
    "avx512/GenuineIntel": {
        (1, 1): ((0.1, 127.0), (0.3, 172.4), (0.5, 190.9), (1.0, 206.1)),
        (16, 1): ((0.1, 98.6), (0.3, 163.7), (0.5, 184.3), (1.0, 224.4)),
        (8, 1): ((0.1, 81.6), (0.3, 157.1), (0.5, 182.1), (1.0, 236.1)),
        (1, 16): ((0.1, 47.1), (0.3, 90.2), (0.5, 103.4), (1.0, 113.1)),
        (4, 4): ((0.1, 71.2), (0.3, 144.8), (0.5, 168.5), (1.0, 215.3)),
        (8, 8): ((0.1, 103.4), (0.3, 180.7), (0.5, 207.2), (1.0, 265.9)),
        (16, 16): ((0.1, 122.0), (0.3, 197.5), (0.5, 227.5), (1.0, 266.3)),
        (32, 32): ((0.1, 135.9), (0.3, 213.0), (0.5, 252.3), (1.0, 282.8)),
    },
    "avx512": {
        (1, 1): ((0.1, 90.0), (0.3, 127.6), (0.5, 142.2), (1.0, 150.0)),
        (16, 1): ((0.1, 58.1), (0.3, 112.4), (0.5, 143.5), (1.0, 169.3)),
        (8, 1): ((0.1, 51.3), (0.3, 111.8), (0.5, 140.0), (1.0, 173.6)),
        (1, 16): ((0.1, 38.1), (0.3, 68.7), (0.5, 78.0), (1.0, 87.4)),
        (4, 4): ((0.1, 57.7), (0.3, 108.6), (0.5, 128.8), (1.0, 172.7)),
        (8, 8): ((0.1, 69.4), (0.3, 127.1), (0.5, 147.5), (1.0, 184.2)),
        (16, 16): ((0.1, 82.7), (0.3, 135.4), (0.5, 161.8), (1.0, 190.4)),
        (32, 32): ((0.1, 88.2), (0.3, 142.7), (0.5, 158.4), (1.0, 184.8)),
    },
    # measured on an AMD EPYC Zen 3 (an AVX2-only CPU, where this path runs), 2026-12-07, the geometric mean of three
    # runs, after float32 blocks took the outer-product kernel above 384 tokens
    "avx2": {
        (1, 1): ((0.1, 46.9), (0.3, 69.9), (0.5, 80.4), (1.0, 81.3)),
        (16, 1): ((0.1, 63.8), (0.3, 94.0), (0.5, 106.3), (1.0, 113.4)),
        (8, 1): ((0.1, 59.9), (0.3, 86.8), (0.5, 102.8), (1.0, 105.2)),
        (1, 16): ((0.1, 33.2), (0.3, 50.1), (0.5, 57.8), (1.0, 63.1)),
        (4, 4): ((0.1, 88.7), (0.3, 111.2), (0.5, 112.7), (1.0, 123.9)),
        (8, 8): ((0.1, 62.2), (0.3, 98.8), (0.5, 104.2), (1.0, 122.7)),
        (16, 16): ((0.1, 81.6), (0.3, 113.1), (0.5, 116.7), (1.0, 141.8)),
        (32, 32): ((0.1, 91.4), (0.3, 116.4), (0.5, 118.7), (1.0, 122.3)),
    },
    "generic": {
        (1, 1): ((0.1, 11.0), (0.3, 12.4), (0.5, 12.5), (1.0, 12.8)),
        (16, 1): ((0.1, 15.2), (0.3, 32.0), (0.5, 39.8), (1.0, 43.2)),
        (8, 1): ((0.1, 21.2), (0.3, 33.8), (0.5, 39.5), (1.0, 42.6)),
        (1, 16): ((0.1, 19.5), (0.3, 34.1), (0.5, 40.2), (1.0, 47.2)),
        (4, 4): ((0.1, 27.3), (0.3, 41.0), (0.5, 45.0), (1.0, 50.6)),
        (8, 8): ((0.1, 31.4), (0.3, 44.1), (0.5, 45.0), (1.0, 46.7)),
        (16, 16): ((0.1, 21.3), (0.3, 35.4), (0.5, 41.7), (1.0, 48.9)),
        (32, 32): ((0.1, 22.9), (0.3, 35.6), (0.5, 41.7), (1.0, 49.3)),
    },
}


def cpu_table_key(path: str, vendor: str | None = None) -> str:
    """The ``THROUGHPUT`` key for CPU kernel path ``path`` on a CPU of ``vendor`` (default: this machine's
    ``vendor_id``): ``"path/vendor"`` where that vendor has a table of its own, else ``path``."""
    if vendor is None:
        from ..bench.environment import cpu_vendor
        vendor = cpu_vendor()
    key = f"{path}/{vendor}"
    return key if key in THROUGHPUT else path


def stored_entries(matrix: torch.Tensor, block: tuple[int, int]) -> int:
    """Entries a ``block`` format stores for ``matrix [N, K]``: whole ``bh x bw`` blocks with a nonzero in them
    (edge blocks count whole: the kernels pad them), or the nonzeros themselves for ``(1, 1)``."""
    nonzero = matrix != 0
    if block == (1, 1):
        return int(nonzero.sum())
    return int(kept_blocks(nonzero, block).sum()) * block[0] * block[1]


def _rate(points: tuple[tuple[float, float], ...], density: float) -> float:
    """Throughput at ``density``: linear between the measured densities, the nearest one outside them."""
    if density <= points[0][0]:
        return points[0][1]
    for (d0, r0), (d1, r1) in zip(points, points[1:]):
        if density <= d1:
            return r0 + (r1 - r0) * (density - d0) / (d1 - d0)
    return points[-1][1]


def choose_block_size(matrix: torch.Tensor, *, path: str, single_entries: bool) -> tuple[tuple[int, int], str]:
    """The candidate block size with the least estimated time for ``matrix [N, K]`` with the throughput table
    ``path`` (a CPU kernel path, or a :func:`cpu_table_key`), and a
    line saying what was estimated. ``single_entries``: whether ``(1, 1)`` (the unstructured format) may be chosen.
    On a path without a table (a device other than the CPU, or an uncalibrated path) the estimate is stored
    entries alone among blocks of at least 16x16, the shapes the GPU kernels run best."""
    n, k = matrix.shape
    table = THROUGHPUT.get(path)
    if table is None:
        candidates = [(16, 16), (32, 32)]
    else:
        candidates = [b for b in CANDIDATES if b in table and (single_entries or b != (1, 1))]
    estimates = []
    for block in candidates:
        stored = stored_entries(matrix, block)
        cost = float(stored) if table is None else stored / _rate(table[block], stored / max(n * k, 1))
        estimates.append((cost, block, stored))
    estimates.sort()
    best = estimates[0]
    what = "stored entries" if table is None else f"stored entries / {path} throughput"
    runner_up = ""
    if len(estimates) > 1 and best[0] > 0:
        runner_up = f", then {_name(estimates[1][1])} at {estimates[1][0] / best[0]:.2f}x its time"
    kept = best[2] / max(n * k, 1)
    return best[1], f"auto: {_name(best[1])} keeps {kept:.3f} of the entries, least {what}{runner_up}"


def _name(block: tuple[int, int]) -> str:
    return f"{block[0]}x{block[1]}"
