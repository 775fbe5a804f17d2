"""The fixed cost of one call at batch 1: each layer of pysparse's call path against torch's dense ``nn.Linear``.

At M=1 the kernel of a 90%-sparse 768->3072 layer takes ~20 us on two cores, and every microsecond of Python or
dispatch around it is a few percent of the call: issue 7's M=1 target (>= 8x over dense) is decided there. For each
weight it times, interleaved in one process (``pysparse.analysis.alternating_medians``), with the same input:

* ``SparseLinear``: the layer users swap in (``nn.Module.__call__``, its checks, the op);
* ``ops.bsr_linear``: the functional form, with its argument checks (``check_indices=False``);
* ``ops.bsr_linear_packed``: no Python checks, the dispatch decision only;
* ``op``: ``torch.ops.pysparse.bsr_linear_act`` through ``call``, below the autograd key (torch's dispatcher, the
  C++ checks, the kernel; called plainly it also enters torch's Python autograd kernel, ~20 us, which the layers
  step around);
* ``nn.Linear`` and ``F.linear`` on the dense weight;
* the two layers again with grad mode on (``torch.enable_grad()`` around the call: an inference call made without
  ``no_grad``; the frozen layer's bias is still a Parameter that wants a gradient).

"1 block" (a 32x32 weight) leaves almost only the fixed cost. Every pysparse variant's output is first checked
against the dense layer.

``--formats`` adds the layers users swap in at small batches: ``SparseLinear.from_dense`` of each block size at 90%
(random block masks) on the issue's FFN shapes, M = 1 and 4, against its dense ``nn.Linear`` (weights warm in cache;
``bench_m1_streaming.py`` reads them from memory).

    python benchmarks/bench_call_overhead.py --threads 2
    python benchmarks/bench_call_overhead.py --threads 2 --formats 32x32 4x4 16x1 1x1
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as bench_cpu_bsr_linear.py: time the kernels, not wake-ups

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pysparse import ops  # noqa: E402
from pysparse._text_table import left_aligned  # noqa: E402
from pysparse.analysis.timing import alternating_medians  # noqa: E402
from pysparse.bench.sweep import block_mask  # noqa: E402
from pysparse.nn import SparseLinear  # noqa: E402
from pysparse.ops.autograd_dispatch import call  # noqa: E402

CASES = {"1 block (32->32)": (32, 32, 0.0), "768->3072 90%": (768, 3072, 0.9)}


def with_grad(module, x):
    with torch.enable_grad():  # the timing runs under no_grad
        return module(x)


def pruned_pair(k: int, n: int, block: tuple[int, int], sparsity: float) -> tuple[torch.nn.Linear, SparseLinear]:
    """A dense ``nn.Linear`` with a random block mask applied, and the SparseLinear packed from it."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(k, n)
    mask = block_mask(n, k, block, sparsity, torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense.weight.mul_(mask)
    return dense, SparseLinear.from_dense(dense, block, mask=mask)


def measure(k: int, n: int, sparsity: float, rounds: int) -> dict:
    dense, layer = pruned_pair(k, n, (32, 32), sparsity)
    v, crow, col, bias = layer.values, layer.crow_indices, layer.col_indices, layer.bias
    x = torch.randn(1, k)
    op = torch.ops.pysparse.bsr_linear_act.default
    fns = {
        "SparseLinear": lambda: layer(x),
        "ops.bsr_linear": lambda: ops.bsr_linear(x, v, crow, col, bias, n, check_indices=False),
        "bsr_linear_packed": lambda: ops.bsr_linear_packed(x, v, crow, col, bias, n),
        "op": lambda: call(op, x, v, crow, col, bias, n, None, None),
        "nn.Linear": lambda: dense(x),
        "F.linear": lambda: F.linear(x, dense.weight, dense.bias),
        "SparseLinear, grad on": lambda: with_grad(layer, x),
        "nn.Linear, grad on": lambda: with_grad(dense, x),
    }
    with torch.no_grad():
        want = dense(x)
        for name in ("SparseLinear", "ops.bsr_linear", "bsr_linear_packed", "op", "SparseLinear, grad on"):
            torch.testing.assert_close(fns[name](), want, rtol=1e-5, atol=1e-5, msg=name)
    return {name: s * 1e6 for name, s in alternating_medians(fns, rounds=rounds, min_run_time=0.3).items()}


FORMAT_SHAPES = [(1536, 384), (384, 1536), (3072, 768), (768, 3072)]


def measure_formats(blocks: list[tuple[int, int]], rounds: int) -> list[list[str]]:
    """Rows of (shape, block, M, dense us, layer us, speedup) for each FORMAT_SHAPES x block at 90% x M in (1, 4)."""
    rows = []
    for k, n in FORMAT_SHAPES:
        for block in blocks:
            dense, layer = pruned_pair(k, n, block, 0.9)
            for m in (1, 4):
                x = torch.randn(m, k)
                with torch.no_grad():
                    torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-4)
                    us = alternating_medians({"dense": lambda: dense(x), "layer": lambda: layer(x)}, rounds=rounds,
                                             min_run_time=0.1)
                rows.append([f"{k}->{n}", f"{block[0]}x{block[1]}", str(m), f"{us['dense'] * 1e6:.1f}",
                             f"{us['layer'] * 1e6:.1f}", f"{us['dense'] / us['layer']:.2f}x"])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--formats", nargs="+", default=None, metavar="BHxBW",
                    help="also time SparseLinear of these block sizes at 90%% against nn.Linear, M = 1 and 4")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for label, (k, n, sparsity) in CASES.items():
        us = measure(k, n, sparsity, args.rounds)
        rows.append([label, *(f"{us[name]:.1f}" for name in us), f"{us['SparseLinear'] - us['op']:.1f}",
                     f"{us['F.linear'] / us['SparseLinear']:.2f}x"])
    head = ["weight, M=1 (us per call)", "SparseLinear", "ops.bsr_linear", "bsr_linear_packed", "op", "nn.Linear",
            "F.linear", "SparseLinear, grad on", "nn.Linear, grad on", "layer - op", "F.linear / layer"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
    print("\n".join(left_aligned(head, rows)))
    if args.formats:
        blocks = [tuple(int(v) for v in b.lower().split("x")) for b in args.formats]
        print()
        print("\n".join(left_aligned(["in->out, 90%", "block", "M", "nn.Linear us", "SparseLinear us", "speedup"],
                                      measure_formats(blocks, args.rounds))))


if __name__ == "__main__":
    main()
