"""``python -m pysparse demo``: the seed flow, offline, on scikit-learn's bundled ``load_digits``.

Train an MLP 64-256-256-10, then for block pruning (L1 and L2 norms, one-shot and gradual) and channel pruning:
prune, measure the one-shot accuracy, fine-tune with the masks held, measure again on the held-out test split,
pack the pruned layers into :class:`pysparse.nn.SparseLinear` (channel masks into
:class:`pysparse.nn.ChannelSparseLinear`), check the packed model's outputs equal the masked
dense model's, and time both against the dense model in the same run.

One more row follows the method of the article the project grew from: train the MLP with a group-lasso penalty
(alpha x the L2 norms of its 16x16 blocks, :class:`pysparse.prune.SparsityRegularizer`) so that whole blocks shrink,
prune the blocks whose norm is below a threshold gamma, fine-tune like the others.

Then structural channel pruning of a small CNN: train it, remove half of its channels physically with
:func:`pysparse.prune.prune_channels`, fine-tune, save the pruned model and load it into a freshly built dense
CNN (:func:`pysparse.save` / :func:`pysparse.load` replay the surgery), and time it against the dense CNN.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import ops
from .analysis import median_seconds, pack_block_size, sensitivity, sparsity_report
from .analysis.timing import alternating_medians
from .io import load, save
from .nn import ChannelSparseLinear, SparseLinear
from .prune import (
    GradualSchedule,
    SparsityRegularizer,
    fine_tune,
    get_masks,
    prune_,
    prune_channels,
    remove_masks,
)

# Global scope (LAMP scores, see prune_) lets the 64-input first layer keep more blocks than the 256-input second.
BLOCK = {"pattern": "block", "block_size": (16, 16), "scope": "global"}
CHANNEL = {"pattern": "channel", "norm": "l2", "scope": "global"}
# Group lasso on the blocks the pruning removes: with alpha 0.01, 40 epochs of Adam leave ~90% of the 16x16 blocks'
# L2 norms near zero while the model keeps its accuracy (benchmarks/regularizer_digits.py: 0.005-0.02 all work,
# 0.1 collapses the model to chance).
GROUP_LASSO = {"alpha": 0.01, "pattern": "block", "block_size": (16, 16), "norm": "group"}
# (method, prune_ keywords, sparsity, how): how is "one-shot" (prune the dense model, then fine-tune), "gradual"
# (prune on a schedule during fine-tuning) or "group lasso" (prune the penalty-trained model at the threshold that
# removes `sparsity` of its blocks, then fine-tune); the output layer is left dense (prune_'s default)
VARIANTS = [
    ("block 16x16 L1", dict(BLOCK, norm="l1"), 0.8, "one-shot"),
    ("block 16x16 L2", dict(BLOCK, norm="l2"), 0.8, "one-shot"),
    ("block 16x16 L1", dict(BLOCK, norm="l1"), 0.9, "one-shot"),
    ("block 16x16 L2", dict(BLOCK, norm="l2"), 0.9, "one-shot"),
    ("block 16x16 L1 gradual", dict(BLOCK, norm="l1"), 0.9, "gradual"),
    ("block 16x16 L2 gradual", dict(BLOCK, norm="l2"), 0.9, "gradual"),
    ("block 16x16 group lasso", {"pattern": "block", "block_size": (16, 16), "norm": "l2"}, 0.9, "group lasso"),
    ("channel L2", CHANNEL, 0.5, "one-shot"),
    ("channel L2", CHANNEL, 0.8, "one-shot"),
]
SMOKE_VARIANTS = [VARIANTS[0], VARIANTS[6], VARIANTS[7]]
COLUMNS = ("method", "sparsity", "zeros", "one-shot", "fine-tuned", "vs dense", "packed err", "KiB packed",
           "speed b=360", "speed b=1")


CNN_RATIO = 0.5   # prune_channels' ratio: the fraction of each coupled channel family removed


def load_data(seed: int):
    """load_digits scaled to [0, 1], split 80/20 stratified: (x_train, y_train, x_test, y_test)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("the demo needs scikit-learn: pip install 'torch-pysparse[demo]'") from None
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, stratify=digits.target,
                                   random_state=seed)
    return x[train], y[train], x[test], y[test]


def mlp() -> nn.Sequential:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(64, 256), act1=nn.ReLU(), fc2=nn.Linear(256, 256),
                                     act2=nn.ReLU(), out=nn.Linear(256, 10)))


class DigitsCNN(nn.Module):
    """conv32-conv64-pool-conv64-pool(2)-fc64-fc10 with BatchNorm, on digits as ``[B, 1, 8, 8]`` images."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def loader(x: torch.Tensor, y: torch.Tensor, seed: int, batch_size: int = 32) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def train_mlp(x_train, y_train, *, epochs: int, seed: int, penalty: dict | None = None, progress: bool = False,
              desc: str = "train dense") -> tuple[nn.Sequential, list[dict]]:
    """An :func:`mlp` trained ``epochs`` epochs (Adam, lr 1e-3, one thread), with the
    :class:`~pysparse.prune.SparsityRegularizer` of keywords ``penalty`` added to the loss if given."""
    torch.manual_seed(seed)
    model = mlp()
    regularizer = SparsityRegularizer(model, **penalty) if penalty else None
    with threads(1):
        history = fine_tune(model, loader(x_train, y_train, seed), F.cross_entropy,
                            torch.optim.Adam(model.parameters(), lr=1e-3), regularizer=regularizer,
                            steps=epochs * len(loader(x_train, y_train, seed)), progress=progress, desc=desc)
    return model, history


def threshold_for(model: nn.Module, sparsity: float, *, block_size=(16, 16)) -> float:
    """The gamma halfway between the block L2 norms ranked ``round(sparsity * blocks)`` and one above, over the
    layers ``prune_`` prunes by default: ``prune_(threshold=gamma, norm="l2")`` then removes that many blocks."""
    norms = SparsityRegularizer(model, alpha=1.0, pattern="block", block_size=block_size).group_norms()
    ranked = torch.cat([n.detach() for n in norms.values()]).sort().values
    k = round(sparsity * ranked.numel())
    if not 0 < k < ranked.numel():
        raise ValueError(f"sparsity must leave some of the {ranked.numel()} blocks pruned and some kept, "
                         f"got {sparsity}")
    return float(ranked[k - 1] + ranked[k]) / 2


def cnn_channel_pruning(x_train, y_train, x_test, y_test, *, dense_epochs: int = 15, tune_epochs: int = 8,
                        seed: int = 0, progress: bool = False) -> dict:
    """Train a :class:`DigitsCNN` on ``x_train`` (``[N, 1, 8, 8]``), remove ``CNN_RATIO`` of its channels with
    ``prune_channels``, fine-tune it.

    Returns the two models (``dense``, ``pruned``), their test accuracies (``dense_accuracy``, ``one_shot``
    right after pruning, ``fine_tuned``) and the ``prune_channels`` report (params and FLOPs per image).
    """
    torch.manual_seed(seed)
    dense = DigitsCNN()
    steps = len(loader(x_train, y_train, seed, 64))
    with threads(1):
        fine_tune(dense, loader(x_train, y_train, seed, 64), F.cross_entropy,
                  torch.optim.Adam(dense.parameters(), lr=3e-3), steps=dense_epochs * steps, progress=progress,
                  desc="train dense CNN")
        dense_acc = accuracy(dense, x_test, y_test)
        pruned, report = prune_channels(copy.deepcopy(dense).eval(), x_train[:1], ratio=CNN_RATIO, return_report=True)
        one_shot = accuracy(pruned, x_test, y_test)
        fine_tune(pruned, loader(x_train, y_train, seed + 1, 64), F.cross_entropy,
                  torch.optim.Adam(pruned.parameters(), lr=1e-3), steps=tune_epochs * steps, progress=progress,
                  desc="fine-tune pruned CNN")
    return {"dense": dense.eval(), "pruned": pruned.eval(), "dense_accuracy": dense_acc, "one_shot": one_shot,
                "fine_tuned": accuracy(pruned, x_test, y_test), "report": report}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def pack(model: nn.Module, masks: dict[str, torch.Tensor], pattern: str, block_size) -> nn.Module:
    """A copy of ``model`` whose masked Linear layers are SparseLinear (from_dense with their masks), or
    ChannelSparseLinear for channel masks (whole output rows)."""
    packed = copy.deepcopy(model)
    remove_masks(packed)
    for name, mask in masks.items():
        linear = packed.get_submodule(name)
        if pattern == "channel":
            layer = ChannelSparseLinear.from_dense(linear, out_index=mask.any(1), in_index=mask.any(0))
        else:
            layer = SparseLinear.from_dense(linear, pack_block_size(pattern, block_size, linear.weight.shape), mask)
        packed.set_submodule(name, layer)
    return packed.eval()


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@contextlib.contextmanager
def threads(n: int):
    """Run torch on ``n`` threads inside the block (training this small MLP gains nothing from more, and on a
    busy machine spinning OpenMP threads make it many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(*, smoke: bool = False, seed: int = 0, timing_threads: int | None = None, progress: bool = False,
        out=print) -> dict:
    """Run the demo, print its tables through ``out`` and return the numbers.

    Training runs on one thread; timings on ``timing_threads`` (default: torch's current setting).
    """
    timing_threads = timing_threads or torch.get_num_threads()
    dense_epochs, tune_epochs = (8, 3) if smoke else (40, 20)
    min_run_time = 0.05 if smoke else 0.2
    x_train, y_train, x_test, y_test = load_data(seed)

    def median_times(model: nn.Module) -> dict[str, float]:
        with threads(timing_threads):
            return {b: median_seconds(model, x, min_run_time=min_run_time) for b, x in batches.items()}

    batches_per_epoch = len(loader(x_train, y_train, seed))
    steps = tune_epochs * batches_per_epoch
    batches = {"b=360": x_test, "b=1": x_test[:1]}
    dense, _ = train_mlp(x_train, y_train, epochs=dense_epochs, seed=seed, progress=progress)
    dense_acc = accuracy(dense, x_test, y_test)
    dense_s = median_times(dense)

    out(f"pysparse demo: load_digits ({len(y_train)} train / {len(y_test)} test, seed {seed}), MLP 64-256-256-10, "
        f"CPU kernel path {ops.available_backends()['cpu']!r}, timed on {timing_threads} thread(s)")
    out(f"dense test accuracy {dense_acc:.2%} after {dense_epochs} epochs (Adam); each pruned model below is "
        f"fine-tuned {tune_epochs} epochs (Adam, cosine lr) with its masks held")
    results = {"dense_accuracy": dense_acc, "variants": []}
    rows = [{"method": "dense", "sparsity": 0.0, "fine_tuned": dense_acc, "packed_bytes": state_bytes(dense),
                 "speed": dict.fromkeys(batches, 1.0)}]
    for salt, (method, kwargs, sparsity, how) in enumerate(SMOKE_VARIANTS if smoke else VARIANTS, start=1):
        if how != "group lasso":
            model = copy.deepcopy(dense)
        else:
            # The smoke run's 8 epochs need a stronger penalty to separate the blocks it will prune
            penalty = dict(GROUP_LASSO, alpha=0.03) if smoke else GROUP_LASSO
            model, history = train_mlp(x_train, y_train, epochs=dense_epochs, seed=seed, penalty=penalty,
                                       progress=progress, desc="train with group lasso")
            penalised = {"accuracy": accuracy(model, x_test, y_test), "alpha": penalty["alpha"],
                             "penalty": history[-1]["penalty"],
                             "gamma": threshold_for(model, sparsity, block_size=kwargs["block_size"])}
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        tune = {"steps": steps, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps),
                    "progress": progress, "desc": method}
        one_shot = None
        with threads(1):
            # gradual: prune 8 times during the first 60% of fine-tuning, then recover at the final sparsity
            if how == "gradual":
                ramp = int(0.6 * steps)
                schedule = GradualSchedule(0.0, sparsity, start_step=0, end_step=ramp, every=max(1, ramp // 8))
                fine_tune(model, loader(x_train, y_train, seed + salt), F.cross_entropy, optimizer,
                          schedule=schedule, **tune, **kwargs)
            else:
                amount = {"threshold": penalised["gamma"]} if how == "group lasso" else {"sparsity": sparsity}
                prune_(model, **amount, **kwargs)
                one_shot = accuracy(model, x_test, y_test)
                fine_tune(model, loader(x_train, y_train, seed + salt), F.cross_entropy, optimizer, **tune)
        masks = {n: m.clone() for n, m in get_masks(model).items()}
        weights = [model.get_submodule(n).weight for n in masks]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)

        packed = pack(model, masks, kwargs["pattern"], kwargs.get("block_size"))
        with torch.no_grad():
            want, got = model(x_test), packed(x_test)
        err = ((got - want).abs().max() / want.abs().max()).item()
        if not err < 1e-5:
            raise RuntimeError(f"{method}: packed model differs from the masked dense model (rel. err {err:.2e})")
        packed_s = median_times(packed)
        tuned = accuracy(model, x_test, y_test)
        results["variants"].append(dict(
            method=method, sparsity=sparsity, zeros=zeros, one_shot=one_shot, fine_tuned=tuned,
            vs_dense=100 * (tuned - dense_acc), packed_err=err, packed_bytes=state_bytes(packed),
            speed={b: dense_s[b] / packed_s[b] for b in batches}, seconds={"dense": dense_s, "pruned": packed_s},
            model=model, **({"penalised": penalised} if how == "group lasso" else {})))
    rows += results["variants"]

    cnn_epochs = (3, 2) if smoke else (15, 8)
    cnn = cnn_channel_pruning(x_train.reshape(-1, 1, 8, 8), y_train, x_test.reshape(-1, 1, 8, 8), y_test,
                              dense_epochs=cnn_epochs[0], tune_epochs=cnn_epochs[1], seed=seed, progress=progress)
    cnn.update(cnn_checkpoint_and_time(cnn, {b: x.reshape(-1, 1, 8, 8) for b, x in batches.items()},
                                       timing_threads, min_run_time))
    results["cnn"] = cnn
    rows += [{"method": "CNN dense", "sparsity": 0.0, "fine_tuned": cnn["dense_accuracy"],
                  "packed_bytes": state_bytes(cnn["dense"]), "speed": dict.fromkeys(batches, 1.0)},
             {"method": "CNN prune_channels L2", "sparsity": CNN_RATIO, "one_shot": cnn["one_shot"],
                  "fine_tuned": cnn["fine_tuned"], "vs_dense": 100 * (cnn["fine_tuned"] - cnn["dense_accuracy"]),
                  "packed_err": cnn["checkpoint_err"], "packed_bytes": state_bytes(cnn["pruned"]),
                  "speed": cnn["speed"]}]
    report = cnn["report"]
    out(f"CNN conv32-conv64-pool-conv64-pool-fc64-fc10 (BatchNorm): trained {cnn_epochs[0]} epochs (Adam), "
        f"prune_channels(ratio={CNN_RATIO}) removes channels physically, then fine-tuned {cnn_epochs[1]} epochs: "
        f"params {report.params_before:,} -> {report.params_after:,}, FLOPs per image "
        f"{report.flops_before / 1e6:.2f}M -> {report.flops_after / 1e6:.2f}M")
    for v in results["variants"]:
        if "penalised" in v:
            p = v["penalised"]
            out(f"{v['method']}: trained {dense_epochs} epochs (Adam) with the group-lasso penalty of alpha "
                f"{p['alpha']:g} on the 16x16 blocks' L2 norms (SparsityRegularizer; "
                f"test accuracy {p['accuracy']:.2%}, "
                f"final penalty {p['penalty']:.3g}); prune_(threshold=gamma) "
                f"at gamma={p['gamma']:.3g}, the block L2 norm below which {v['sparsity']:.0%} of the blocks lie, "
                f"removes {v['zeros']:.1%} of the weights")
    out("")
    out(format_table(rows))

    if not smoke:
        method, _, sparsity, _ = VARIANTS[0]
        out("")
        out(f"Sparsity report of '{method}' at {sparsity} (FLOPs for the whole test set):")
        out(sparsity_report(results["variants"][0]["model"], x_test, block_size=(16, 16)).table())
        out("")
        out("Sensitivity of the dense model (one layer pruned at a time, 16x16 L1 blocks, no fine-tuning, "
            "budget 1 point):")
        with threads(timing_threads):
            result = sensitivity(dense, lambda m: accuracy(m, x_test, y_test), x_test,
                                 sparsities=(0.5, 0.7, 0.8, 0.9, 0.95), budget=0.01, pattern="block",
                                 block_size=(16, 16), min_run_time=min_run_time)
        out(result.table())
        results["sensitivity"] = result
    return results


def results_json(results: dict) -> dict:
    """The JSON-able numbers of :func:`run`'s results (what ``--json`` writes): accuracies, sparsities, errors,
    sizes, median times (``seconds``) and the speeds computed from them, per MLP variant and for the CNN."""
    def plain(d: dict) -> dict:
        return {k: v for k, v in d.items() if isinstance(v, (int, float, str, dict, type(None)))}

    cnn = results["cnn"]
    return {"dense_accuracy": results["dense_accuracy"], "variants": [plain(v) for v in results["variants"]],
            "cnn": plain({k: cnn[k] for k in ("dense_accuracy", "one_shot", "fine_tuned", "checkpoint_err",
                                              "speed", "seconds")})}


def cnn_checkpoint_and_time(cnn: dict, batches: dict[str, torch.Tensor], timing_threads: int,
                            min_run_time: float) -> dict:
    """Save the pruned CNN, load it into a freshly built dense :class:`DigitsCNN` (the checkpoint replays the
    channel surgery) and check it computes what the pruned model computes; time dense and pruned CNNs in
    alternating rounds. Returns ``checkpoint_err``, ``seconds`` (median time per model and batch) and ``speed``
    (dense time / pruned time per batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cnn.safetensors")
        save(cnn["pruned"], path)
        reloaded = load(DigitsCNN(), path).eval()
    x = max(batches.values(), key=len)
    with torch.no_grad():
        want, got = cnn["pruned"](x), reloaded(x)
    err = ((got - want).abs().max() / want.abs().max()).item()
    if not err < 1e-5:
        raise RuntimeError(f"the CNN loaded from its checkpoint differs from the pruned CNN (rel. err {err:.2e})")
    speed, seconds = {}, {"dense": {}, "pruned": {}}
    with threads(timing_threads):
        for b, x in batches.items():
            t = alternating_medians({name: (lambda m=cnn[name], x=x: m(x)) for name in ("dense", "pruned")},
                                    min_run_time=min_run_time)
            speed[b] = t["dense"] / t["pruned"]
            seconds["dense"][b], seconds["pruned"][b] = t["dense"], t["pruned"]
    return {"checkpoint_err": err, "speed": speed, "seconds": seconds, "reloaded": reloaded}


def format_table(rows: list[dict]) -> str:
    """One line per row dict (method, sparsity, fine_tuned, packed_bytes, speed; zeros, one_shot, vs_dense and
    packed_err print "-" when absent)."""
    widths = (24, 9, 7, 10, 11, 9, 11, 11, 12, 10)

    def line(cells):
        return "".join(f"{c:<{w}}" if j == 0 else f"{c:>{w}}" for j, (c, w) in enumerate(zip(cells, widths)))

    def cell(row, key, fmt):
        return "-" if row.get(key) is None else format(row[key], fmt)

    lines = [line(COLUMNS)]
    for r in rows:
        lines.append(line((r["method"], f"{r['sparsity']:.2f}", cell(r, "zeros", ".3f"), cell(r, "one_shot", ".2%"),
                           f"{r['fine_tuned']:.2%}", cell(r, "vs_dense", "+.2f"), cell(r, "packed_err", ".1e"),
                           f"{r['packed_bytes'] / 1024:.1f}", *(f"{s:.3g}x" for s in r["speed"].values()))))
    lines += [
        "MLP rows: sparsity: target over the pruned layers (fc1, fc2; global scope, the output layer stays dense);",
        "zeros: the measured fraction of zero weights in them after fine-tuning; vs dense: accuracy points against",
        "'dense'; packed err: max |packed - masked dense| / max |masked dense| on the test set; block masks are",
        "packed as SparseLinear, channel masks (whole output rows) as ChannelSparseLinear. CNN rows: sparsity: the",
        "fraction of each coupled channel family prune_channels removed (a smaller dense model: no zeros); vs dense:",
        "against 'CNN dense'; packed err: the same relative error between the pruned CNN and the CNN saved",
        "(pysparse.save) and loaded into a freshly built dense CNN (pysparse.load). KiB packed: state_dict size.",
        "speed: dense model time / pruned model time, median of repeated runs after warm-up (torch.utils.benchmark),",
        "same process; > 1 means the pruned model is faster.",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds: fewer epochs, two pruning methods, short timings (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the batches")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the timings (default: torch's setting, i.e. all cores)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the numbers (accuracies, median times, speeds) to PATH as JSON")


def main(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    results = run(smoke=args.smoke, seed=args.seed, timing_threads=args.threads, progress=sys.stderr.isatty())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results_json(results), f, indent=1)
    return 0
