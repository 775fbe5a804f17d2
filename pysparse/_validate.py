"""Argument checks that name the argument, what was expected and what came (ValueError / TypeError)."""
from __future__ import annotations

import torch


def as_pair(name: str, value) -> tuple[int, int]:
    """An int or a pair of ints >= 1 (e.g. a block size) as a tuple of two ints."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got bool")
    if isinstance(value, int):
        value = (value, value)
    try:
        pair = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}") from None
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"{name} must be >= 1 in both dimensions, got {pair}")
    return int(pair[0]), int(pair[1])


def check_tensor(name: str, t, *, dims: int | None = None, dtypes=None, shape: tuple | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
