"""The correctness gate every benchmark passes before it is timed: error relative to the largest reference output."""
from __future__ import annotations

import torch

# Same bounds as the kernel tests (tests/conftest.py): one layer against the dense masked reference.
LAYER_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# A whole model chains dozens of layers (and, in low precision, rounds between them), so errors add up.
MODEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float64; inf when ``got`` has a NaN/inf (a poisoned or broken output)."""
    got, want = got.detach().double(), want.detach().double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    return diff / scale if scale > 0 else diff
