"""Pruning schedules: the gradual cubic ramp of Zhu & Gupta (one-shot pruning needs no schedule)."""
from __future__ import annotations

from numbers import Integral

from .mask_selection import check_sparsity

__all__ = ["GradualSchedule"]


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
