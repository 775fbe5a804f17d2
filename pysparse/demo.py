"""``python -m pysparse demo``: the seed flow, offline, on scikit-learn's bundled ``load_digits``.

Train an MLP 64-256-256-10, then for block pruning (L1 and L2 norms, one-shot and gradual) and channel pruning:
prune, measure the one-shot accuracy, fine-tune with the masks held, measure again on the held-out test split,
pack the pruned layers into :class:`pysparse.nn.SparseLinear`, check the packed model's outputs equal the masked
dense model's, and time both against the dense model in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import ops
from .analysis import median_seconds, pack_block_size, sensitivity, sparsity_report
from .nn import SparseLinear
from .prune import GradualSchedule, fine_tune, get_masks, prune_, remove_masks

# Global scope (LAMP scores, see prune_) lets the 64-input first layer keep more blocks than the 256-input second.
BLOCK = dict(pattern="block", block_size=(16, 16), scope="global")
CHANNEL = dict(pattern="channel", norm="l2", scope="global")
# (method, prune_ keywords, sparsity, gradual?) ; the output layer is left dense (prune_'s default)
VARIANTS = [
    ("block 16x16 L1", dict(BLOCK, norm="l1"), 0.8, False),
    ("block 16x16 L2", dict(BLOCK, norm="l2"), 0.8, False),
    ("block 16x16 L1", dict(BLOCK, norm="l1"), 0.9, False),
    ("block 16x16 L2", dict(BLOCK, norm="l2"), 0.9, False),
    ("block 16x16 L1 gradual", dict(BLOCK, norm="l1"), 0.9, True),
    ("block 16x16 L2 gradual", dict(BLOCK, norm="l2"), 0.9, True),
    ("channel L2", CHANNEL, 0.5, False),
    ("channel L2", CHANNEL, 0.8, False),
]
SMOKE_VARIANTS = [VARIANTS[0], VARIANTS[6]]
COLUMNS = ("method", "sparsity", "zeros", "one-shot", "fine-tuned", "vs dense", "packed err", "KiB packed",
           "speed b=360", "speed b=1")


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


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def pack(model: nn.Module, masks: dict[str, torch.Tensor], pattern: str, block_size) -> nn.Module:
    """A copy of ``model`` whose masked Linear layers are SparseLinear (from_dense with their masks)."""
    packed = copy.deepcopy(model)
    remove_masks(packed)
    for name, mask in masks.items():
        linear = packed.get_submodule(name)
        packed.set_submodule(name, SparseLinear.from_dense(linear, pack_block_size(pattern, block_size,
                                                                                   linear.weight.shape), mask))
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

    def loader(salt: int) -> DataLoader:
        return DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True,
                          generator=torch.Generator().manual_seed(seed + salt))

    def median_times(model: nn.Module) -> dict[str, float]:
        with threads(timing_threads):
            return {b: median_seconds(model, x, min_run_time=min_run_time) for b, x in batches.items()}

    steps = tune_epochs * len(loader(0))
    batches = {"b=360": x_test, "b=1": x_test[:1]}
    torch.manual_seed(seed)
    dense = mlp()
    with threads(1):
        fine_tune(dense, loader(0), F.cross_entropy, torch.optim.Adam(dense.parameters(), lr=1e-3),
                  steps=dense_epochs * len(loader(0)), progress=progress, desc="train dense")
    dense_acc = accuracy(dense, x_test, y_test)
    dense_s = median_times(dense)

    out(f"pysparse demo: load_digits ({len(y_train)} train / {len(y_test)} test, seed {seed}), MLP 64-256-256-10, "
        f"CPU kernel path {ops.available_backends()['cpu']!r}, timed on {timing_threads} thread(s)")
    out(f"dense test accuracy {dense_acc:.2%} after {dense_epochs} epochs (Adam); each pruned model below is "
        f"fine-tuned {tune_epochs} epochs (Adam, cosine lr) with its masks held")
    results = {"dense_accuracy": dense_acc, "variants": []}
    for salt, (method, kwargs, sparsity, gradual) in enumerate(SMOKE_VARIANTS if smoke else VARIANTS, start=1):
        model = copy.deepcopy(dense)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        tune = dict(steps=steps, lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps),
                    progress=progress, desc=method)
        one_shot = None
        with threads(1):
            if gradual:  # prune 8 times during the first 60% of fine-tuning, then recover at the final sparsity
                ramp = int(0.6 * steps)
                schedule = GradualSchedule(0.0, sparsity, start_step=0, end_step=ramp, every=max(1, ramp // 8))
                fine_tune(model, loader(salt), F.cross_entropy, optimizer, schedule=schedule, **tune, **kwargs)
            else:
                prune_(model, sparsity=sparsity, **kwargs)
                one_shot = accuracy(model, x_test, y_test)
                fine_tune(model, loader(salt), F.cross_entropy, optimizer, **tune)
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
        results["variants"].append(dict(
            method=method, sparsity=sparsity, zeros=zeros, one_shot=one_shot,
            fine_tuned=accuracy(model, x_test, y_test), packed_err=err, packed_bytes=state_bytes(packed),
            speed={b: dense_s[b] / packed_s[b] for b in batches}, model=model))
    out("")
    out(format_table(dense_acc, state_bytes(dense), results["variants"]))

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


def format_table(dense_acc: float, dense_bytes: int, variants: list[dict]) -> str:
    widths = (24, 9, 7, 10, 11, 9, 11, 11, 12, 10)

    def line(cells):
        return "".join(f"{c:<{w}}" if j == 0 else f"{c:>{w}}" for j, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(COLUMNS),
             line(("dense", "0.00", "-", "-", f"{dense_acc:.2%}", "-", "-", f"{dense_bytes / 1024:.1f}", "1x", "1x"))]
    for v in variants:
        lines.append(line((v["method"], f"{v['sparsity']:.2f}", f"{v['zeros']:.3f}",
                           "-" if v["one_shot"] is None else f"{v['one_shot']:.2%}", f"{v['fine_tuned']:.2%}",
                           f"{100 * (v['fine_tuned'] - dense_acc):+.2f}", f"{v['packed_err']:.1e}",
                           f"{v['packed_bytes'] / 1024:.1f}", *(f"{s:.3g}x" for s in v["speed"].values()))))
    lines += [
        "sparsity: target over the pruned layers (fc1, fc2; global scope, the output layer stays dense); zeros: the",
        "measured fraction of zero weights in them after fine-tuning; vs dense: accuracy points; packed err:",
        "max |packed - masked dense| / max |masked dense| on the test set; KiB packed: state_dict of the packed model;",
        "speed: dense model time / packed model time, median of repeated runs after warm-up (torch.utils.benchmark),",
        "same process; > 1 means the packed model is faster. Channel masks are packed as SparseLinear with one row",
        "per block (ChannelSparseLinear is not built yet).",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds: fewer epochs, two pruning methods, short timings (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the batches")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the timings (default: torch's setting, i.e. all cores)")


def main(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    run(smoke=args.smoke, seed=args.seed, timing_threads=args.threads, progress=sys.stderr.isatty())
    return 0
