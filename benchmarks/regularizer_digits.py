"""Issue 21's targets on the demo's digits models: sparsity-inducing training, then pruning at a threshold gamma.

MLP (64-256-256-10): for each seed, (a) train dense 40 epochs, prune 90% of the 16x16 blocks one-shot by magnitude
(the demo's global L1 and L2 rows); (b) train 40 epochs from the same init with the group-lasso penalty
(``SparsityRegularizer(alpha, pattern="block", block_size=16, norm="group")``), prune at the gamma below which 90%
of the blocks' L2 norms lie (``prune_(threshold=gamma, norm="l2")``). Both then get the same fine-tuning (20
epochs, Adam, cosine lr, masks held). Reported: one-shot accuracy (before fine-tuning) and fine-tuned accuracy,
mean over seeds.

CNN (``--models cnn``, network slimming): train the demo's DigitsCNN with an L1 penalty on its BatchNorm scales
(``pattern="bn"``), remove the channels whose |gamma| is below the threshold that leaves about half the FLOPs
(``prune_channels(importance="bn", threshold=...)``), fine-tune; against the dense CNN.

Slow (minutes on 2 cores): a script, not a test.

    python benchmarks/regularizer_digits.py [--models mlp,cnn] [--seeds 0,1,2] [--alphas 0.005,0.01,0.02]
        [--cnn-alphas 0.001] [--json out.json]
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

BLOCKS = {"pattern": "block", "block_size": (16, 16)}
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
    rows.append({"method": "dense", "seed": seed, "fine_tuned": accuracy(dense, x_test, y_test)})
    for norm in ("l1", "l2"):
        model = copy.deepcopy(dense)
        prune_(model, sparsity=SPARSITY, norm=norm, scope="global", **BLOCKS)
        one_shot = accuracy(model, x_test, y_test)
        rows.append({"method": f"magnitude {norm.upper()} (global)", "seed": seed, "sparsity": mask_sparsity(model),
                         "one_shot": one_shot, "fine_tuned": tune(model, x, y, x_test, y_test, epochs=tune_epochs,
                                                            seed=seed + 1)})
    for alpha in alphas:
        model, _ = train_mlp(x, y, epochs=dense_epochs, seed=seed, penalty=dict(GROUP_LASSO, alpha=alpha))
        trained = accuracy(model, x_test, y_test)
        gamma = threshold_for(model, SPARSITY, block_size=BLOCKS["block_size"])
        prune_(model, threshold=gamma, norm="l2", **BLOCKS)
        one_shot = accuracy(model, x_test, y_test)
        rows.append({"method": f"group lasso alpha={alpha:g}", "seed": seed, "penalised": trained, "gamma": gamma,
                         "sparsity": mask_sparsity(model), "one_shot": one_shot,
                         "fine_tuned": tune(model, x, y, x_test, y_test, epochs=tune_epochs, seed=seed + 1)})
    return rows


def train_cnn(x, y, seed, alpha, epochs):
    """The demo's CNN training (Adam 3e-3, batch 64), with an L1 penalty of ``alpha`` on the BatchNorm scales."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    reg = SparsityRegularizer(model, alpha=alpha, pattern="bn") if alpha else None
    with threads(1):
        fine_tune(model, loader(x, y, seed, 64), F.cross_entropy, torch.optim.Adam(model.parameters(), lr=3e-3),
                  steps=epochs * len(loader(x, y, seed, 64)), regularizer=reg, progress=False)
    return model


def slim(model, example, flops_fraction):
    """``prune_channels(importance="bn", threshold=gamma)`` at the largest gamma among the |BN scales| whose pruned
    model keeps at least ``flops_fraction`` of the FLOPs (bisection: FLOPs fall as gamma rises)."""
    scales = torch.cat([m.weight.detach().abs() for m in model.modules()
                        if isinstance(m, torch.nn.BatchNorm2d)]).sort().values

    def pruned_at(i):
        return prune_channels(copy.deepcopy(model).eval(), example, threshold=float(scales[i]), importance="bn",
                              return_report=True)

    lo, hi = 0, len(scales) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        _, report = pruned_at(mid)
        lo, hi = (mid, hi) if report.flops_after >= flops_fraction * report.flops_before else (lo, mid - 1)
    return (*pruned_at(lo), float(scales[lo]))


def cnn_seed(seed, alphas, flops_fraction=0.5, *, dense_epochs=15, tune_epochs=8) -> list[dict]:
    """Network slimming on DigitsCNN at about ``flops_fraction`` of the FLOPs, against the dense CNN."""
    x, y, x_test, y_test = load_data(seed)
    x, x_test = x.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    rows = [{"method": "CNN dense", "seed": seed, "fine_tuned": accuracy(train_cnn(x, y, seed, 0.0, dense_epochs),
                                                                    x_test, y_test)}]
    for alpha in alphas:
        model = train_cnn(x, y, seed, alpha, dense_epochs)
        pruned, report, gamma = slim(model, x[:1], flops_fraction)
        one_shot = accuracy(pruned, x_test, y_test)
        with threads(1):
            fine_tune(pruned, loader(x, y, seed + 1, 64), F.cross_entropy,
                      torch.optim.Adam(pruned.parameters(), lr=1e-3), steps=tune_epochs * len(loader(x, y, seed, 64)),
                      progress=False)
        rows.append({"method": f"CNN slimming alpha={alpha:g}", "seed": seed,
                     "penalised": accuracy(model, x_test, y_test),
                         "gamma": gamma, "flops": report.flops_after / report.flops_before, "one_shot": one_shot,
                         "fine_tuned": accuracy(pruned, x_test, y_test)})
    return rows


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
    parser.add_argument("--models", default="mlp", help="mlp, cnn (network slimming) or mlp,cnn")
    parser.add_argument("--cnn-alphas", default="0.001", help="alphas of the L1 penalty on BatchNorm scales")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    models = args.models.split(",")
    start, rows = time.time(), []
    for seed in seeds:
        if "mlp" in models:
            rows += mlp_seed(seed, alphas)
        if "cnn" in models:
            rows += cnn_seed(seed, [float(a) for a in args.cnn_alphas.split(",")])
        print(f"seed {seed} done after {time.time() - start:.0f} s", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": time.time() - start}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
