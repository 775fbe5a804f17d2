"""Channel pruning speed, measured against the dense model / layer in the same process.

1. torchvision ResNet-50 (random init), batch 8, 224x224, float32: prune_channels to about half its FLOPs, then
   FLOPs, params and latency before / after.
2. ChannelSparseLinear / ChannelSparseConv2d at 50% kept output and input channels vs the dense nn.Linear /
   nn.Conv2d (each result checked against the masked dense layer before it is timed).

Latency is the median of repeated runs after warm-up at --threads threads (``pysparse.analysis.median_seconds``);
errors are ``pysparse.bench.check.rel_err``. Tables print last; --json saves them.

    python benchmarks/bench_channel.py [--threads 2] [--ratio 0.3] [--min-run-time 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from pysparse.analysis import median_seconds
from pysparse.bench.check import LAYER_TOLERANCE, rel_err
from pysparse.bench.models import flops
from pysparse.nn import ChannelSparseConv2d, ChannelSparseLinear
from pysparse.prune import prune_channels


def median_ms(fn, min_run_time: float) -> float:
    return median_seconds(fn, min_run_time=min_run_time) * 1e3


def resnet50_table(ratio: float, min_run_time: float) -> dict:
    import copy

    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(8, 3, 224, 224)
    pruned = prune_channels(copy.deepcopy(dense), torch.randn(1, 3, 224, 224), ratio=ratio, round_to=8)
    row = {"flops_before": flops(dense, x), "params_before": sum(p.numel() for p in dense.parameters()),
           "flops_after": flops(pruned, x), "params_after": sum(p.numel() for p in pruned.parameters())}
    # alternate the two twice and keep each one's best median: the machine is shared and noisy
    times = {"before": [], "after": []}
    for _ in range(2):
        times["before"].append(median_ms(lambda: dense(x), min_run_time))
        times["after"].append(median_ms(lambda: pruned(x), min_run_time))
    row["ms_before"], row["ms_after"] = min(times["before"]), min(times["after"])
    return row


def layer_rows(min_run_time: float) -> list[dict]:
    torch.manual_seed(1)
    rows = []
    half = lambda n: torch.randperm(n)[: n // 2].sort().values  # noqa: E731
    for m, k, n in ((256, 1024, 4096), (256, 4096, 1024), (64, 768, 3072), (1024, 512, 512)):
        dense = nn.Linear(k, n)
        layer = ChannelSparseLinear.from_dense(dense, half(n), half(k))
        x = torch.randn(m, k)
        ref = layer.to_linear()
        with torch.no_grad():
            err = rel_err(layer(x), ref(x))
        assert err < LAYER_TOLERANCE[torch.float32], err
        rows.append({"layer": f"Linear {k}->{n}, M={m}", "dense_ms": median_ms(lambda: dense(x), min_run_time),
                     "sparse_ms": median_ms(lambda: layer(x), min_run_time)})
    for b, c, o, hw, ks in ((8, 256, 256, 28, 3), (8, 128, 512, 28, 1), (8, 512, 512, 14, 3), (8, 64, 64, 56, 3)):
        dense = nn.Conv2d(c, o, ks, padding=ks // 2)
        layer = ChannelSparseConv2d.from_dense(dense, half(o), half(c))
        x = torch.randn(b, c, hw, hw)
        ref = layer.to_conv2d()
        with torch.no_grad():
            err = rel_err(layer(x), ref(x))
        assert err < LAYER_TOLERANCE[torch.float32], err
        rows.append({"layer": f"Conv2d {c}->{o} k{ks}, {b}x{hw}x{hw}",
                     "dense_ms": median_ms(lambda: dense(x), min_run_time),
                     "sparse_ms": median_ms(lambda: layer(x), min_run_time)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.3, help="prune_channels ratio for ResNet-50")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed runs per measurement")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "torch": torch.__version__}
    lines = []
    if not args.skip_resnet:
        r = resnet50_table(args.ratio, args.min_run_time)
        out["resnet50"] = r
        lines += [f"ResNet-50, batch 8, 224x224, float32, {args.threads} threads, prune_channels(ratio={args.ratio})",
                  f"{'':10} {'GFLOPs':>8} {'params (M)':>11} {'latency (ms)':>13}"]
        for tag, key in (("dense", "before"), ("pruned", "after")):
            lines.append(f"{tag:10} {r['flops_' + key] / 1e9:8.2f} {r['params_' + key] / 1e6:11.2f} "
                         f"{r['ms_' + key]:13.1f}")
        lines += [f"FLOPs kept {r['flops_after'] / r['flops_before']:.1%}, "
                  f"speed-up {r['ms_before'] / r['ms_after']:.2f}x", ""]
    rows = layer_rows(args.min_run_time)
    out["layers"] = rows
    lines += [f"Channel-sparse layers, 50% of output and input channels kept, float32, {args.threads} threads",
              f"{'layer':<34} {'dense ms':>9} {'sparse ms':>10} {'speed-up':>9}"]
    lines += [f"{r['layer']:<34} {r['dense_ms']:9.2f} {r['sparse_ms']:10.2f} {r['dense_ms'] / r['sparse_ms']:8.2f}x"
              for r in rows]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
