"""Issue 21's targets on the demo's digits models: sparsity-inducing training, then pruning at a threshold gamma.

MLP (64-256-256-10): for each seed, (a) train dense 40 epochs, prune 90% of the 16x16 blocks one-shot by magnitude
(the demo's global L1 and L2 rows); (b) train 40 epochs from the same init with the group-lasso penalty
(``SparsityRegularizer(alpha, pattern="block", block_size=16, norm="group")``), prune at the gamma below which 90%
of the blocks' L2 norms lie (``prune_(threshold=gamma, norm="l2")``). Both then get the same fine-tuning (20
epochs, Adam, cosine lr, masks held). Reported: one-shot accuracy (before fine-tuning) and fine-tuned accuracy,
mean over seeds.

CNN (``--cnn``, network slimming): train the demo's DigitsCNN with an L1 penalty on its BatchNorm scales
(``pattern="bn"``), remove the channels whose |gamma| is below the threshold that leaves about half the FLOPs
(``prune_channels(importance="bn", threshold=...)``), fine-tune; against the dense CNN.

Slow (minutes on 2 cores): a script, not a test.

    python benchmarks/regularizer_digits.py [--seeds 0,1,2] [--alphas 0.005,0.01,0.02] [--cnn] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pysparse.demo import (
    GROUP_LASSO,
    DigitsCNN,
    accuracy,
    load_data,
    loader,
    threads,
    threshold_for,
    train_mlp,
)
from pysparse.prune import SparsityRegularizer, fine_tune, mask_sparsity, prune_, prune_channels

BLOCKS = dict(pattern="block", block_size=(16, 16))
SPARSITY = 0.9


def tune(model, x, y, x_test, y_test, *, epochs, seed):
    """The demo's fine-tuning: Adam 1e-3, cosine lr, masks held; test accuracy after."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * len(loader(x, y, seed))
    with threads(1):
        fine_tune(model, loader(x, y, seed), F.cross_entropy, optimizer, steps=steps, progress=False,
                  lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps))
    return accuracy(model, x_test, y_test)


def mlp_seed(seed, alphas, *, dense_epochs=40, tune_epochs=20) -> list[dict]:
    x, y, x_test, y_test = load_data(seed)
    rows = []
    dense, _ = train_mlp(x, y, epochs=dense_epochs, seed=seed)
    rows.append(dict(method="dense", seed=seed, fine_tuned=accuracy(dense, x_test, y_test)))
    for norm in ("l1", "l2"):
        model = copy.deepcopy(dense)
        prune_(model, sparsity=SPARSITY, norm=norm, scope="global", **BLOCKS)
        one_shot = accuracy(model, x_test, y_test)
        rows.append(dict(method=f"magnitude {norm.upper()} (global)", seed=seed, sparsity=mask_sparsity(model),
                         one_shot=one_shot, fine_tuned=tune(model, x, y, x_test, y_test, epochs=tune_epochs,
                                                            seed=seed + 1)))
    for alpha in alphas:
        model, _ = train_mlp(x, y, epochs=dense_epochs, seed=seed, penalty=dict(GROUP_LASSO, alpha=alpha))
        trained = accuracy(model, x_test, y_test)
        gamma = threshold_for(model, SPARSITY, block_size=BLOCKS["block_size"])
        prune_(model, threshold=gamma, norm="l2", **BLOCKS)
        one_shot = accuracy(model, x_test, y_test)
        rows.append(dict(method=f"group lasso alpha={alpha:g}", seed=seed, penalised=trained, gamma=gamma,
                         sparsity=mask_sparsity(model), one_shot=one_shot,
                         fine_tuned=tune(model, x, y, x_test, y_test, epochs=tune_epochs, seed=seed + 1)))
    return rows


def cnn_seed(seed, alpha, flops_fraction=0.5, *, dense_epochs=15, tune_epochs=8) -> list[dict]:
    """Network slimming on DigitsCNN; gamma: the largest |BN scale| threshold whose pruned CNN keeps at least
    ``flops_fraction`` of the dense FLOPs (found by bisection on the sorted scales)."""
    x, y, x_test, y_test = load_data(seed)
    x, x_test = x.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    steps = dense_epochs * len(loader(x, y, seed, 64))
    models = {}
    for name, a in (("dense", 0.0), ("slimming", alpha)):
        torch.manual_seed(seed)
        model = DigitsCNN()
        reg = SparsityRegularizer(model, alpha=a, pattern="bn") if a else None
        with threads(1):
            fine_tune(model, loader(x, y, seed, 64), F.cross_entropy, torch.optim.Adam(model.parameters(), lr=3e-3),
                      steps=steps, regularizer=reg, progress=False)
        models[name] = model
    dense_acc = accuracy(models["dense"], x_test, y_test)
    scales = torch.cat([m.weight.detach().abs() for m in models["slimming"].modules()
                        if isinstance(m, torch.nn.BatchNorm2d)]).sort().values

    def pruned_at(gamma):
        return prune_channels(copy.deepcopy(models["slimming"]).eval(), x[:1], threshold=gamma, importance="bn",
                              return_report=True)

    lo, hi = 0, len(scales) - 1
    while lo < hi:   # the largest gamma index whose FLOPs stay >= flops_fraction
        mid = (lo + hi + 1) // 2
        _, report = pruned_at(float(scales[mid]))
        if report.flops_after >= flops_fraction * report.flops_before:
            lo = mid
        else:
            hi = mid - 1
    gamma = float(scales[lo])
    pruned, report = pruned_at(gamma)
    one_shot = accuracy(pruned, x_test, y_test)
    steps = tune_epochs * len(loader(x, y, seed, 64))
    with threads(1):
        fine_tune(pruned, loader(x, y, seed + 1, 64), F.cross_entropy, torch.optim.Adam(pruned.parameters(), lr=1e-3),
                  steps=steps, progress=False)
    return [dict(method="CNN dense", seed=seed, fine_tuned=dense_acc),
            dict(method=f"CNN slimming alpha={alpha:g}", seed=seed, penalised=accuracy(models["slimming"], x_test,
                                                                                        y_test),
                 gamma=gamma, flops=report.flops_after / report.flops_before, one_shot=one_shot,
                 fine_tuned=accuracy(pruned, x_test, y_test))]


def table(rows: list[dict]) -> str:
    """Mean over seeds per method (accuracies in %, sparsity / FLOPs fraction as is)."""
    keys = ("sparsity", "flops", "gamma", "penalised", "one_shot", "fine_tuned")
    lines = ["| method | " + " | ".join(keys) + " | seeds |", "|---" * (len(keys) + 2) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        cells = []
        for k in keys:
            values = [r[k] for r in group if r.get(k) is not None]
            if not values:
                cells.append("-")
            elif k in ("penalised", "one_shot", "fine_tuned"):
                cells.append(f"{100 * statistics.mean(values):.2f}")
            else:
                cells.append(f"{statistics.mean(values):.3g}")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(group)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--alphas", default=str(GROUP_LASSO["alpha"]))
    parser.add_argument("--cnn", action="store_true", help="also network slimming on the digits CNN")
    parser.add_argument("--cnn-alpha", type=float, default=1e-3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    start, rows = time.time(), []
    for seed in seeds:
        rows += mlp_seed(seed, alphas)
        if args.cnn:
            rows += cnn_seed(seed, args.cnn_alpha)
        print(f"seed {seed} done after {time.time() - start:.0f} s", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": time.time() - start}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
