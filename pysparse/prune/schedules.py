"""Pruning schedules (one-shot, gradual cubic) and a training loop that applies them with a progress bar."""
from __future__ import annotations

from numbers import Integral

import torch
from torch import nn
from tqdm.auto import tqdm

from .masking import mask_sparsity, prune_
from .masks import check_sparsity

__all__ = ["GradualSchedule", "fine_tune"]


class GradualSchedule:
    """Cubic sparsity ramp of Zhu & Gupta (2017), "To prune, or not to prune":

    ``s(t) = final + (initial - final) * (1 - (t - start_step) / (end_step - start_step)) ** 3``, evaluated at
    the pruning steps ``start_step, start_step + every, ...`` and at ``end_step``; between them the sparsity
    holds. It prunes fast early (while many redundant weights remain) and slowly near ``final``.
    ``initial`` before ``start_step``, ``final`` from ``end_step`` on.
    """

    def __init__(self, initial: float = 0.0, final: float = 0.9, start_step: int = 0, end_step: int = 1000,
                 every: int = 100):
        check_sparsity("initial", initial)
        check_sparsity("final", final)
        if initial > final:
            raise ValueError(f"initial must be <= final, got initial={initial}, final={final}")
        for name, value in (("start_step", start_step), ("end_step", end_step), ("every", every)):
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if start_step < 0 or end_step < start_step:
            raise ValueError(f"need 0 <= start_step <= end_step, got start_step={start_step}, end_step={end_step}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.initial, self.final = float(initial), float(final)
        self.start_step, self.end_step, self.every = int(start_step), int(end_step), int(every)

    def is_pruning_step(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``."""
        return step == self.end_step or (self.start_step <= step < self.end_step
                                         and (step - self.start_step) % self.every == 0)

    @property
    def steps(self) -> list[int]:
        """All pruning steps, in order."""
        return [*range(self.start_step, self.end_step, self.every), self.end_step]

    def __call__(self, step: int) -> float:
        """Target sparsity at ``step`` (that of the last pruning step at or before it)."""
        if step < self.start_step:
            return self.initial
        if step >= self.end_step:
            return self.final
        last = self.start_step + (step - self.start_step) // self.every * self.every
        progress = (last - self.start_step) / (self.end_step - self.start_step)
        return self.initial + (self.final - self.initial) * (1.0 - (1.0 - progress) ** 3)  # exact at start

    def __repr__(self) -> str:
        return (f"GradualSchedule(initial={self.initial}, final={self.final}, start_step={self.start_step}, "
                f"end_step={self.end_step}, every={self.every})")


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
