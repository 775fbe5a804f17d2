"""The rows of grad_output that carry a gradient, for the backward of the sparse layers.

A loss over the real positions of a padded batch (distillation's, a masked language model's) gives the padding
tokens no gradient, and in a BERT-style encoder nothing flows back into them either: their rows of every layer's
grad_output are exactly zero, and they add nothing to grad_input (zero rows) or grad_values. MiniLM recovery batches
padded to 128 tokens are 85% padding, so the backward kernels run on the rows that carry a gradient, gathered, and
grad_input's other rows are written as zeros. ``pysparse::nonzero_rows`` finds them (a row with a gradient usually
costs it one 64-element block).

A zero gradient times NaN or inf is NaN, so a zero row is still computed where its row of x holds one, and every
row where the weight's values do (the dense product would propagate them): skipping changes no result.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers torch.ops.pysparse.*)

__all__ = ["SKIP_SHARE", "as_rows", "gather_gradient_rows", "rows_with_gradient", "rows_to_full"]

# The share of zero rows from which the gathers pay: below it the kernels run on every row.
SKIP_SHARE = 0.125


@torch.library.register_fake("pysparse::nonzero_rows")
def _nonzero_rows_fake(grad, input=None, values=None):
    torch._check(grad.dim() == 2, lambda: f"grad must be 2-D, got {grad.dim()}-D")
    return grad.new_empty((grad.shape[0],), dtype=torch.bool)


def rows_with_gradient(grad: torch.Tensor, input: torch.Tensor | None, values: torch.Tensor | None
                       ) -> torch.Tensor | None:
    """Indices (int64) of the rows of ``grad`` ([M, N]) the backward computes (``pysparse::nonzero_rows``; ``input``
    [M, K] when grad_values is wanted, ``values`` when grad_input is), or None when it should run on every row: under
    ``torch.compile`` or a tracing tensor subclass (fake, functional: the sizes would depend on the data), off the
    CPU, or when fewer than ``SKIP_SHARE`` of the rows can be skipped."""
    m = grad.shape[0]
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor or grad.device.type != "cpu" or m == 0:
        return None
    rows = torch.ops.pysparse.nonzero_rows(grad, input, values).nonzero().squeeze(1)
    if m - rows.numel() < SKIP_SHARE * m:
        return None
    return rows


def gather_gradient_rows(grad: torch.Tensor, input: torch.Tensor | None, values: torch.Tensor | None):
    """``(g, x, rows)``: ``grad`` and ``input`` as ``[rows, features]``, gathered to the rows the backward computes
    (:func:`rows_with_gradient`; ``input`` None when grad_values is not wanted, ``values`` None when grad_input is
    not), and those rows' indices, None when every row runs (``g`` and ``x`` then views of the whole)."""
    g, x = as_rows(grad), None if input is None else as_rows(input)
    rows = rows_with_gradient(g, x, values)
    if rows is not None:
        g, x = g.index_select(0, rows), None if x is None else x.index_select(0, rows)
    return g, x, rows


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., F]`` as ``[rows, F]`` (reshape(-1, F) is ambiguous when F is 0)."""
    return t.flatten(0, -2) if t.dim() > 1 else t.unsqueeze(0)


def rows_to_full(part: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """``[m, K]`` with ``part``'s rows at ``rows`` (increasing, from :func:`rows_with_gradient`) and zeros elsewhere."""
    return torch.ops.pysparse.rows_to_full(part, rows, m)


@torch.library.register_fake("pysparse::rows_to_full")
def _rows_to_full_fake(part, rows, m):
    return part.new_empty((m, part.shape[1]))
