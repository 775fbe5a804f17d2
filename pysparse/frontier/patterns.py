"""The sparsity patterns a frontier sweeps, named as the command line names them.

``unstructured``, ``N:M`` (``2:4``) or ``BHxBW`` (``16x1`` = 16 consecutive outputs sharing one input column,
``32x32`` blocks). Each name maps to the keywords that prune it (``prune_`` / ``sparsegpt_``) and to the block size
``sparsify`` packs it with: single entries (unstructured, N:M) pack as ``(1, 1)``, which has its own format.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Pattern", "parse_pattern", "parse_point", "DEFAULT_PATTERNS", "DEFAULT_SPARSITIES"]

DEFAULT_PATTERNS = ("unstructured", "2:4", "16x1", "1x16", "4x4", "8x8", "16x16", "32x32")
DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Pattern:
    name: str                      # as written on the command line: "unstructured", "2:4", "16x1"
    pattern: str                   # prune_'s pattern: "unstructured" | "nm" | "block"
    block_size: tuple[int, int]    # what sparsify packs with
    nm: tuple[int, int] | None = None

    def prune_kwargs(self) -> dict:
        """Keywords for ``prune_`` / ``sparsegpt_`` / ``magnitude_mask``."""
        kwargs = {"pattern": self.pattern}
        if self.pattern == "block":
            kwargs["block_size"] = self.block_size
        if self.nm is not None:
            kwargs["nm"] = self.nm
        return kwargs

    def fixed_sparsity(self) -> float | None:
        """N:M fixes its sparsity (1 - N/M); the others take any."""
        return None if self.nm is None else 1 - self.nm[0] / self.nm[1]


def parse_pattern(text: str) -> Pattern:
    """``"unstructured"``, ``"N:M"`` or ``"BHxBW"`` -> :class:`Pattern`; anything else raises ValueError."""
    text = text.strip().lower()
    if text == "unstructured":
        return Pattern("unstructured", "unstructured", (1, 1))
    if m := re.fullmatch(r"(\d+):(\d+)", text):
        n, m_ = int(m[1]), int(m[2])
        if not 0 < n < m_:
            raise ValueError(f"pattern N:M needs 0 < N < M, got {text!r}")
        return Pattern(text, "nm", (1, 1), (n, m_))
    if m := re.fullmatch(r"(\d+)x(\d+)", text):
        bh, bw = int(m[1]), int(m[2])
        if bh < 1 or bw < 1:
            raise ValueError(f"pattern BHxBW needs positive sizes, got {text!r}")
        if (bh, bw) == (1, 1):
            return parse_pattern("unstructured")
        return Pattern(text, "block", (bh, bw))
    raise ValueError(f"pattern must be 'unstructured', 'N:M' (e.g. 2:4) or 'BHxBW' (e.g. 16x1, 32x32), got {text!r}")


def parse_point(text: str) -> tuple[Pattern, float]:
    """``"PATTERN,SPARSITY"`` (``"16x1,0.7"``, ``"2:4,0.5"``) -> (pattern, sparsity)."""
    name, sep, amount = text.rpartition(",")
    if not sep:
        raise ValueError(f"--point must be PATTERN,SPARSITY (e.g. 16x1,0.7), got {text!r}")
    pattern = parse_pattern(name)
    try:
        sparsity = float(amount)
    except ValueError:
        raise ValueError(f"--point's sparsity must be a fraction such as 0.7, got {amount!r}") from None
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"--point's sparsity must be in (0, 1), got {sparsity}")
    fixed = pattern.fixed_sparsity()
    if fixed is not None and abs(fixed - sparsity) > 1e-9:
        raise ValueError(f"pattern {pattern.name} fixes sparsity at {fixed:g}, got {sparsity:g}")
    return pattern, sparsity
