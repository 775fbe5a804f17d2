"""Parsing and checking the bench command's options: a bad one is a :class:`UsageError` (exit code 2), named."""
from __future__ import annotations

import math

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """An option the benchmark cannot run with; the command prints it and exits with code 2, like argparse."""


def _items(option: str, text: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",")]
    if not all(items):
        raise UsageError(f"{option}: expected a comma-separated list, got {text!r}")
    return items


def _positive_int(option: str, text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{option}: expected {what}, got {text!r}") from None
    if value < 1:
        raise UsageError(f"{option}: {what} must be >= 1, got {value}")
    return value


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"3072x768,768x3072"`` -> ``[(3072, 768), (768, 3072)]``: out_features x in_features, as nn.Linear."""
    shapes = []
    for item in _items("--shapes", text):
        parts = item.lower().split("x")
        if len(parts) != 2:
            raise UsageError(f"--shapes: expected NxK (out_features x in_features), e.g. 3072x768, got {item!r}")
        shapes.append(tuple(_positive_int("--shapes", p, "NxK with N, K integers") for p in parts))
    return shapes


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """``"32,16x8"`` -> ``[(32, 32), (16, 8)]``: square blocks by one number, else BHxBW."""
    blocks = []
    for item in _items("--blocks", text):
        parts = item.lower().split("x")
        if len(parts) not in (1, 2):
            raise UsageError(f"--blocks: expected B or BHxBW, e.g. 32 or 16x8, got {item!r}")
        sizes = [_positive_int("--blocks", p, "a block size (integer)") for p in parts]
        blocks.append((sizes[0], sizes[-1]))
    return blocks


def parse_sparsities(text: str) -> list[float]:
    """Fractions of blocks dropped, each in [0, 1) (1 would leave no weight to multiply)."""
    values = []
    for item in _items("--sparsities", text):
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"--sparsities: expected numbers in [0, 1), got {item!r}") from None
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise UsageError(f"--sparsities: each sparsity must be in [0, 1), got {item}")
        values.append(value)
    return values


def parse_batch_sizes(text: str) -> list[int]:
    return [_positive_int("--batch-sizes", item, "a batch size (integer)") for item in _items("--batch-sizes", text)]


def check_blocks_fit(blocks, shapes, what: str = "shape") -> None:
    """Every block must fit in every matrix it tiles (``shapes`` as ``{name: (N, K)}`` or a list of ``(N, K)``)."""
    named = shapes.items() if isinstance(shapes, dict) else ((f"{n}x{k}", (n, k)) for n, k in shapes)
    for name, (n, k) in named:
        for bh, bw in blocks:
            if bh > n or bw > k:
                raise UsageError(f"--blocks: block {bh}x{bw} is larger than {what} {name} ({n}x{k}, N x K)")
