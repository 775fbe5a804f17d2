"""The correctness gate every benchmark passes before it is timed: error relative to the largest reference output
(a layer) or to the part of the output the input decides (a whole model), and a refusal of references that do
not depend on their input."""
from __future__ import annotations

import torch

# Same bounds as the kernel tests (tests/conftest.py): one layer against the dense masked reference.
LAYER_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# A whole model chains dozens of layers (and, in low precision, rounds between them), so errors add up.
MODEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    """``max |got - want| / scale`` in float64, ``scale`` defaulting to ``max |want|``; inf when ``got`` has a
    NaN/inf (a poisoned or broken output)."""
    got, want = got.detach().double(), want.detach().double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    return diff / scale if scale > 0 else diff


def input_signal(want: torch.Tensor, other: torch.Tensor) -> float:
    """``max |want - other|``: how far the reference output moves when the input is replaced by another one.

    A model whose output barely depends on its input (a random-init network whose activations vanish, so every
    output is the classifier's bias) gives the same output with right and wrong layers alike: the error must be
    measured against this input-dependent part, not against the output's size."""
    return (want.detach().double() - other.detach().double()).abs().max().item()


def degenerate(want: torch.Tensor, signal: float, tolerance: float) -> str | None:
    """Why ``want`` cannot tell a right model from a wrong one, or None: its input-dependent part (``signal``,
    see :func:`input_signal`) is not even ``tolerance`` of its size, the error the check allows."""
    size = want.detach().double().abs().max().item()
    if not signal > tolerance * size:  # also catches NaN
        return (f"the reference output hardly depends on the input (changing the input moves it by {signal:.2e}, "
                f"its largest value is {size:.2e}): comparing with it proves nothing")
    return None


def as_precise_as_dense(err_exact: float, dense_err_exact: float, tolerance: float) -> bool:
    """The 16-bit model check's second chance: a sparse model whose error against the float32 result of the same
    pruned model (``err_exact``) is no larger than the dense 16-bit model's own (``dense_err_exact``) plus
    ``tolerance`` is as right as dense PyTorch in that dtype. Deep models can round further than the tolerance in 16
    bits (a random-weight ResNet-50 in bfloat16: 0.32 of the input-dependent signal from float32), and a sparse model
    that rounds at other points (a residual add and ReLU fused in float32) then differs from the dense one by as much
    without being any less exact."""
    return err_exact <= dense_err_exact + tolerance
