"""Recovery training: the loop that fine-tunes a pruned model with its masks held, pruning on a schedule."""
from __future__ import annotations

from numbers import Integral

import torch
from torch import nn
from tqdm.auto import tqdm

from .mask_holding import mask_sparsity, prune_
from .schedules import GradualSchedule

__all__ = ["fine_tune"]


def fine_tune(model: nn.Module, data, loss_fn, optimizer: torch.optim.Optimizer, *, steps: int,
              schedule: GradualSchedule | None = None, lr_scheduler=None, progress: bool = True,
              desc: str = "fine-tune", **prune_kwargs) -> list[dict]:
    """Train ``model`` for ``steps`` optimizer steps, pruning on ``schedule`` and holding masks throughout.

    Args:
        data: an iterable of ``(input, target)`` batches, iterated again (a new epoch) whenever it runs out,
            so a shuffling ``DataLoader`` reshuffles.
        loss_fn: ``loss_fn(model(input), target) -> scalar tensor``.
        schedule: when given, ``prune_(model, sparsity=schedule(step), **prune_kwargs)`` runs at each of its
            pruning steps (before that step's update). Without it, the masks the model already holds (if any)
            are kept as they are: one-shot pruning followed by fine-tuning, or plain training.
        lr_scheduler: a ``torch.optim.lr_scheduler`` stepped after every optimizer step.
        progress: show a tqdm bar with the loss and the measured sparsity of the masked layers.
    Returns:
        one ``{"step", "loss", "sparsity"}`` record per step.
    """
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if schedule is not None and not isinstance(schedule, GradualSchedule):
        raise TypeError(f"schedule must be a GradualSchedule or None, got {type(schedule).__name__}")
    if schedule is None and prune_kwargs:
        raise TypeError(f"pruning arguments {sorted(prune_kwargs)} need a schedule")
    model.train()
    history = []
    sparsity = mask_sparsity(model)
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        while len(history) < steps:
            epoch_batches = 0
            for inputs, targets in data:
                step = len(history)
                if step >= steps:
                    break
                if schedule is not None and schedule.is_pruning_step(step):
                    prune_(model, sparsity=schedule(step), **prune_kwargs)
                    sparsity = mask_sparsity(model)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()
                if lr_scheduler is not None:
                    lr_scheduler.step()
                value = loss.item()
                history.append({"step": step, "loss": value, "sparsity": sparsity})
                bar.set_postfix(loss=f"{value:.4f}", sparsity=f"{sparsity:.3f}", refresh=False)
                bar.update(1)
                epoch_batches += 1
            if epoch_batches == 0:
                raise ValueError("data yielded no batches (pass a re-iterable such as a list or a DataLoader, "
                                 "not a one-shot iterator)")
    return history
