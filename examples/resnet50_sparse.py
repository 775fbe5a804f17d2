"""torchvision ResNet-50 with block-sparse convolutions: prune every conv with >= 64 input channels to 90%
32x32-block sparsity, sparsify, and compare outputs and latency with the dense model, in one process.

    python examples/resnet50_sparse.py [--batch 8] [--size 224] [--sparsity 0.9] [--threads 2] [--no-fold-bn]
                                       [--no-fuse] [--json out.json]

The weights are torchvision's random initialisation (nothing is downloaded) with random BatchNorm statistics (so
folding them is not the identity); speed does not depend on them, and the outputs are compared with the masked
dense model with its BatchNorms as they are. Convolutions are pruned on the layout SparseConv2d packs
(``conv_weight_matrix``: a 32x32 block is 32 output x 32 input channels of one kernel tap). With ``--fold-bn``
(default) every BatchNorm is folded into the convolution before it, in the sparse model and in a second dense
baseline, so the ratio compares like with like; the dense model with its BatchNorms is timed as well. Each dense
baseline is timed both in NCHW and channels-last and the faster one is reported; the sparse model runs
channels-last (its layers produce channels-last outputs).
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from pysparse.analysis.timing import alternating_medians
from pysparse import fold_batchnorm, sparsify
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


def randomise_batchnorm_(model, gen: torch.Generator) -> None:
    """Running statistics and affine parameters away from the (0, 1, 1, 0) of a fresh model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


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
    ap.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                    help="fold BatchNorm into the convolutions of the sparse model and of a second dense baseline")
    ap.add_argument("--no-fuse", action="store_true",
                    help="keep the residual adds and ReLUs separate ops (default: sparsify fuses them into the "
                         "convolutions' kernels, rewriting the Bottleneck blocks' forward)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import torchvision
    model = torchvision.models.resnet50(weights=None).eval()
    randomise_batchnorm_(model, torch.Generator().manual_seed(1))
    n_pruned = prune_convs_(model, args.sparsity, args.block, args.min_in_channels)
    x = torch.randn(args.batch, 3, args.size, args.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def channels_last(m):
        return copy.deepcopy(m).to(memory_format=torch.channels_last)

    dense = {"dense": (model, channels_last(model))}   # BN as is: (NCHW, channels-last)
    if args.fold_bn:
        folded = fold_batchnorm(model)
        dense["dense_folded"] = (folded, channels_last(folded))
    fns = {}
    for name, (nchw, cl) in dense.items():
        fns[f"{name}_nchw"] = lambda m=nchw: m(x)
        fns[f"{name}_channels_last"] = lambda m=cl: m(x_cl)
    with torch.no_grad():
        sparse = sparsify(model, block_size=(args.block, args.block), fold_batchnorm=args.fold_bn,
                          fuse_activations=not args.no_fuse)
        fns["sparse"] = lambda: sparse(x_cl)
        ref = model(x)
        errors = {"sparse_vs_masked_dense": rel_err(sparse(x_cl), ref)}
        if args.fold_bn:
            errors["dense_folded_vs_dense"] = rel_err(folded(x), ref)
        seconds = alternating_medians(fns, rounds=args.rounds, min_run_time=args.min_time)
        times = {name: s * 1e3 for name, s in seconds.items()}  # ms
    best = {name: min(times[f"{name}_nchw"], times[f"{name}_channels_last"]) for name in dense}
    report = sparse.sparsify_report
    print(report)
    print()
    bn = "BN folded" if args.fold_bn else "BN as is"
    print(f"ResNet-50, {n_pruned} convs with >= {args.min_in_channels} input channels pruned to {args.sparsity:.0%} "
          f"{args.block}x{args.block}-block sparsity ({len(report.swapped)} layers swapped"
          + (f", {len(sparse.fold_report.folded)} BatchNorms folded" if args.fold_bn else "")
          + f"); batch {args.batch}, {args.size}x{args.size}, float32, {args.threads} threads")
    print(f"  sparse ({bn}) vs masked dense (BN as is) logits: rel. err {errors['sparse_vs_masked_dense']:.2e} "
          f"(max |diff| / max |ref|)")
    if args.fold_bn:
        print(f"  dense (BN folded) vs dense (BN as is) logits: rel. err {errors['dense_folded_vs_dense']:.2e}")
    print("  latency (dense: the faster of NCHW and channels-last):")
    labels = {"dense": "dense (BN as is)", "dense_folded": "dense (BN folded)"}
    for name in dense:
        print(f"    {labels[name]:<20}{best[name]:7.0f} ms  (NCHW {times[f'{name}_nchw']:.0f}, channels-last "
              f"{times[f'{name}_channels_last']:.0f})")
    ratios = "; ".join(f"{best[name] / times['sparse']:.2f}x vs {labels[name]}" for name in dense)
    print(f"    {'sparse (' + bn + ')':<20}{times['sparse']:7.0f} ms  -> {ratios}")
    if args.json:
        like = "dense_folded" if args.fold_bn else "dense"
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "size": args.size, "sparsity": args.sparsity, "block": args.block,
                       "threads": args.threads, "fold_bn": args.fold_bn,
                       "rel_err_vs_masked_dense": errors["sparse_vs_masked_dense"],
                       "rel_err_dense_folded_vs_dense": errors.get("dense_folded_vs_dense"), "ms": times,
                       "speedup_vs_best_dense": best[like] / times["sparse"],
                       "speedup_vs_best_dense_bn_as_is": best["dense"] / times["sparse"],
                       "report": report.to_dict(),
                       "fold_report": sparse.fold_report.to_dict() if args.fold_bn else None}, f, indent=1)


if __name__ == "__main__":
    main()
