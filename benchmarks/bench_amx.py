"""bfloat16 SparseLinear on AMX tiles ("avx512amx") against the AVX-512 kernels ("avx512", bfloat16 widened to
float32) and dense bfloat16 ``F.linear`` (oneDNN, itself on AMX), in one process, interleaved
(``alternating_medians``). Each variant's layer is packed under its own path and checked against the dense masked
layer first. Needs a CPU with AMX (Intel Sapphire Rapids or later).

    python benchmarks/bench_amx.py --threads 2
    python benchmarks/bench_amx.py --threads 2 --tokens 4,8,16,32 --blocks 32x32    # where AMX starts to win
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch loads libgomp (see bench_cpu_bsr_linear.py)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pysparse import _C, ops  # noqa: E402
from pysparse.ops.cpu_path import path_request  # noqa: E402
from pysparse.analysis.timing import alternating_medians  # noqa: E402
from pysparse.bench.sweep import block_mask  # noqa: E402
from pysparse.nn import SparseLinear  # noqa: E402


def _pairs(text: str, sep: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(sep)) for item in text.split(",")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="384x1536,1536x384,768x3072,3072x768", help="IN x OUT features")
    ap.add_argument("--blocks", default="32x32,16x16")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--tokens", default="128,1024,4096", help="M values")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if "avx512amx" not in ops.cpu_paths():
        raise SystemExit(f"this CPU has no AMX path (it runs {ops.cpu_paths()})")
    torch.set_num_threads(args.threads)
    print(f"# bfloat16, {args.threads} threads; ratios are dense bfloat16 time over each variant's")
    print("| in->out | block | sparsity | M | dense ms | avx512 ms | amx ms | avx512 vs dense | amx vs dense "
          "| amx vs avx512 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for k, n in _pairs(args.shapes, "x"):
        for block in _pairs(args.blocks, "x"):
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                dense = nn.Linear(k, n).to(torch.bfloat16)
                with torch.no_grad():
                    dense.weight.mul_(block_mask(n, k, block, sparsity, gen).to(torch.bfloat16))
                layers = {}
                for path in ("avx512", "avx512amx"):
                    with ops.force_cpu_path(path):
                        layers[path] = SparseLinear.from_dense(dense, block)
                for m in (int(t) for t in args.tokens.split(",")):
                    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                    with torch.no_grad():
                        want = dense(x).float()
                        for path, layer in layers.items():
                            with ops.force_cpu_path(path):
                                torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=5e-2)

                    def on(path):
                        request = path_request(path)

                        def run():  # the raw switch: a context manager per call would be timed too
                            _C.force_cpu_path(*request)
                            with torch.no_grad():
                                layers[path](x)
                        return run

                    def plain():
                        with torch.no_grad():
                            dense(x)

                    t = alternating_medians({"dense": plain, "avx512": on("avx512"), "amx": on("avx512amx")},
                                            rounds=args.rounds, min_run_time=0.05)
                    _C.force_cpu_path(-1, -1)
                    print(f"| {k}->{n} | {block[0]}x{block[1]} | {sparsity:.0%} | {m} | {t['dense'] * 1e3:.3f} "
                          f"| {t['avx512'] * 1e3:.3f} | {t['amx'] * 1e3:.3f} | {t['dense'] / t['avx512']:.2f}x "
                          f"| {t['dense'] / t['amx']:.2f}x | {t['avx512'] / t['amx']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
