"""Plain-text tables for the reports' ``str()`` (sparsify, fold_batchnorm)."""
from __future__ import annotations


def left_aligned(head: tuple, rows: list[tuple]) -> list[str]:
    """``head`` and ``rows`` as lines of left-aligned columns, two spaces apart, trailing spaces stripped."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *rows)]
