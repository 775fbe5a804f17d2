"""Does the default CPU kernel choice keep up with every compiled path, point by point? (issue #23's "every point
>= 0.85x the best compiled path forced for that point").

For each shape x pattern x sparsity x M it packs the layer once per compiled path variant (each path and, on the
SIMD paths, the broadcast kernel on and off; packed under that variant with ``pysparse.ops.force_cpu_path``, so
each gets the weight layout it reads), checks every variant against the dense masked weight, then times the
default layer, every variant and dense ``F.linear`` alternating in one process (``alternating_medians``). Each
timed call sets its variant's path first (a C call of ~0.1 us, the same for the default, which sets "no request").
It prints, per point, the default's speed over dense, the best variant and its speed, and default / best; points
below ``--bar`` (0.85) are marked. Where a kernel's own rules exclude it (the float32 broadcast kernel above
``kBcastMaxTokens`` on AVX2, above 16 tokens on AVX-512), forcing it on runs the default kernel under another name:
such points compare one kernel with itself, and a ratio below the bar there is noise (``--recheck`` them).

    python benchmarks/bench_path_choice.py                           # the issue's grid at 70% / 90% (~20 min)
    python benchmarks/bench_path_choice.py --patterns 32x32 --m 1 4 16 --sparsity 0.9 --shapes 768x3072
    python benchmarks/bench_path_choice.py --json results.json
    python benchmarks/bench_path_choice.py --recheck results.json --rounds 7 --min-time 0.1   # the low points again

Shapes are ``in->out`` (K x N); patterns ``BHxBW`` or ``unstructured``.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # before torch loads libgomp (see bench_cpu_bsr_linear.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pysparse import _C  # noqa: E402
from pysparse.analysis.timing import alternating_medians  # noqa: E402
from pysparse.bench.check import LAYER_TOLERANCE, rel_err  # noqa: E402
from pysparse.bench.environment import collect, describe  # noqa: E402
from pysparse.bench.sweep import block_mask  # noqa: E402
from pysparse.nn import SparseLinear  # noqa: E402
from pysparse.ops.cpu_path import cpu_paths, force_cpu_path, path_request  # noqa: E402

SHAPES = ("1536x384", "384x1536", "3072x768", "768x3072")
PATTERNS = ("32x32", "16x16", "16x1", "4x4", "unstructured")
MS = (1, 16, 128, 1024, 4096)


def variants() -> list[tuple[str, bool | None]]:
    """(path, broadcast) of every compiled variant this CPU runs for float32; the broadcast kernel only exists on
    SIMD paths, and "avx512bf16" differs from "avx512" only for bfloat16 weights."""
    out = []
    for isa in (p for p in cpu_paths() if p != "avx512bf16"):
        out += [(isa, None)] if isa == "generic" else [(isa, True), (isa, False)]
    return out


def _label(isa: str, broadcast: bool | None) -> str:
    return isa if broadcast is None else f"{isa}/{'bcast' if broadcast else 'nobcast'}"


def pruned_weight(n: int, k: int, pattern: str, sparsity: float, seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    block = (1, 1) if pattern == "unstructured" else tuple(int(v) for v in pattern.split("x"))
    mask = block_mask(n, k, block, sparsity, gen)
    return torch.randn(n, k, generator=gen) * mask, block


def run_point(k: int, n: int, pattern: str, sparsity: float, ms, *, rounds: int, min_time: float) -> list[dict]:
    weight, block = pruned_weight(n, k, pattern, sparsity, seed=k * 7 + n)
    linear = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layers = {"default": (SparseLinear.from_dense(linear, block_size=block), path_request())}
    for isa, broadcast in variants():
        with force_cpu_path(isa, broadcast=broadcast):
            layers[_label(isa, broadcast)] = (SparseLinear.from_dense(linear, block_size=block),
                                              path_request(isa, broadcast))
    rows = []
    previous = _C.cpu_path_request()
    for m in ms:
        x = torch.randn(m, k)
        try:
            with torch.no_grad():
                want = F.linear(x, weight, linear.bias)
                fns = {"dense": lambda x=x: F.linear(x, linear.weight, linear.bias)}
                for name, (layer, request) in layers.items():
                    _C.force_cpu_path(*request)
                    err = rel_err(layer(x), want)
                    if err > LAYER_TOLERANCE[torch.float32]:
                        raise AssertionError(f"{k}->{n} {pattern} {sparsity} M={m} {name}: relative error {err:.2e}")
                    fns[name] = lambda layer=layer, request=request, x=x: (_C.force_cpu_path(*request), layer(x))
                seconds = alternating_medians(fns, rounds=rounds, min_run_time=min_time)
        finally:
            _C.force_cpu_path(*previous)
        forced = {name: s for name, s in seconds.items() if name not in ("dense", "default")}
        best = min(forced, key=forced.get)
        rows.append({"shape": f"{k}x{n}", "pattern": pattern, "sparsity": sparsity, "m": m,
                     "dense_s": seconds["dense"], "default_s": seconds["default"], "best": best,
                     "best_s": forced[best], "forced_s": forced,
                     "default_over_best": forced[best] / seconds["default"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="in x out, e.g. 768x3072")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.7, 0.9])
    parser.add_argument("--m", nargs="+", type=int, default=list(MS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per variant per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bar", type=float, default=0.85, help="mark points whose default / best is below this")
    parser.add_argument("--json", default=None, help="write the rows and the environment here")
    parser.add_argument("--recheck", default=None, metavar="JSON",
                        help="time again only the points of an earlier --json below --bar (noise or real?)")
    args = parser.parse_args()
    points = [(s, p, sp, args.m) for s in args.shapes for p in args.patterns for sp in args.sparsity]
    if args.recheck:
        with open(args.recheck) as f:
            low = [r for r in json.load(f)["rows"] if r["default_over_best"] < args.bar]
        points = [(r["shape"], r["pattern"], r["sparsity"], [r["m"]]) for r in low]
    if args.threads:
        torch.set_num_threads(args.threads)
    env = collect("cpu")
    print(describe(env))
    print(f"variants: {', '.join(_label(*v) for v in variants())}")
    print(f"{'shape':>9} {'pattern':>12} {'sp':>4} {'M':>5} | {'default':>8} | {'best forced':>18} {'speed':>7} | "
          f"{'def/best':>8}")
    rows = []
    for shape, pattern, sparsity, ms in points:
        k, n = (int(v) for v in shape.split("x"))
        for row in run_point(k, n, pattern, sparsity, ms, rounds=args.rounds, min_time=args.min_time):
            rows.append(row)
            mark = "  <" if row["default_over_best"] < args.bar else ""
            print(f"{row['shape']:>9} {pattern:>12} {sparsity:>4} {row['m']:>5} | "
                  f"{row['dense_s'] / row['default_s']:>7.2f}x | {row['best']:>18} "
                  f"{row['dense_s'] / row['best_s']:>6.2f}x | {row['default_over_best']:>8.2f}{mark}", flush=True)
    low = [r for r in rows if r["default_over_best"] < args.bar]
    ratios = sorted(r["default_over_best"] for r in rows)
    print(f"\n{len(rows)} points; default / best forced: min {ratios[0]:.2f}, median {ratios[len(ratios) // 2]:.2f}; "
          f"{len(low)} below {args.bar}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
