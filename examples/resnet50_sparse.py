"""torchvision ResNet-50 with block-sparse convolutions: prune every conv with >= 64 input channels to 90%
32x32-block sparsity, sparsify, and compare outputs and latency with the dense model, in one process.

    python examples/resnet50_sparse.py [--batch 8] [--size 224] [--sparsity 0.9] [--threads 2] [--json out.json]

The weights are torchvision's random initialisation (nothing is downloaded); speed does not depend on them, and
the outputs are compared with the masked dense model. Convolutions are pruned on the layout SparseConv2d packs
(``conv_weight_matrix``: a 32x32 block is 32 output x 32 input channels of one kernel tap). The dense baseline is
timed both in NCHW and channels-last and the faster one is reported; the sparse model runs channels-last (its
layers produce channels-last outputs).
"""
from __future__ import annotations

import argparse
import json

import torch

from pysparse.analysis.timing import alternating_medians
from pysparse.convert import sparsify
from pysparse.nn import conv_weight_from_matrix, conv_weight_matrix
from pysparse.prune import magnitude_mask


def prune_convs_(model, sparsity: float, block: int, min_in_channels: int) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.in_channels >= min_in_channels:
            mat = conv_weight_matrix(m.weight.detach())
            mask = magnitude_mask(mat, sparsity=sparsity, norm="l1", pattern="block", block_size=(block, block))
            with torch.no_grad():
                m.weight.mul_(conv_weight_from_matrix(mask, m.weight.shape))
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--min-in-channels", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per timing round and variant")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import torchvision
    model = torchvision.models.resnet50(weights=None).eval()
    n_pruned = prune_convs_(model, args.sparsity, args.block, args.min_in_channels)
    x = torch.randn(args.batch, 3, args.size, args.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model_cl = torchvision.models.resnet50(weights=None).eval()
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    with torch.no_grad():
        sparse = sparsify(model, block_size=(args.block, args.block))
        ref = model(x)
        out = sparse(x_cl)
        rel_err = ((out - ref).abs().max() / ref.abs().max()).item()
        seconds = alternating_medians({"dense_nchw": lambda: model(x), "dense_channels_last": lambda: model_cl(x_cl),
                                       "sparse": lambda: sparse(x_cl)}, rounds=args.rounds, min_run_time=args.min_time)
        times = {name: s * 1e3 for name, s in seconds.items()}  # ms
    report = sparse.sparsify_report
    best_dense = min(times["dense_nchw"], times["dense_channels_last"])
    print(report)
    print()
    print(f"ResNet-50, {n_pruned} convs with >= {args.min_in_channels} input channels pruned to {args.sparsity:.0%} "
          f"{args.block}x{args.block}-block sparsity ({len(report.swapped)} layers swapped); batch {args.batch}, "
          f"{args.size}x{args.size}, float32, {args.threads} threads")
    print(f"  sparse vs masked dense logits: rel. err {rel_err:.2e} (max |diff| / max |ref|)")
    print(f"  latency: dense NCHW {times['dense_nchw']:.0f} ms, dense channels-last "
          f"{times['dense_channels_last']:.0f} ms, sparse {times['sparse']:.0f} ms -> "
          f"{best_dense / times['sparse']:.2f}x vs the faster dense")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "size": args.size, "sparsity": args.sparsity, "block": args.block,
                       "threads": args.threads, "rel_err_vs_masked_dense": rel_err, "ms": times,
                       "speedup_vs_best_dense": best_dense / times["sparse"], "report": report.to_dict()},
                      f, indent=1)


if __name__ == "__main__":
    main()
