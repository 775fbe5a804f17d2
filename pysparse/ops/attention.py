"""Scaled-dot-product attention on the CPU (float32): the ops ``pysparse::attention`` (inference) and
``pysparse::attention_forward`` / ``attention_backward`` (training, differentiable through
``torch.library.register_autograd``), the drop-in :func:`scaled_dot_product_attention` that falls back to torch's
function wherever the kernel does not apply, the fake kernels and a float64 reference."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers torch.ops.pysparse.*)
from .layer_support import call, wants_grad

__all__ = ["scaled_dot_product_attention", "attention_reference", "attention_kernel_applies", "attention_bshd"]


def attention_kernel_applies(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                             enable_gqa: bool = False) -> bool:
    """Whether :func:`scaled_dot_product_attention` runs pysparse's kernel for these arguments (else torch's)."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if any(t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    if dropout_p != 0.0 or (isinstance(attn_mask, torch.Tensor) and wants_grad(attn_mask)):
        return False  # no gradient for the mask: torch's function has one
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or is_causal or attn_mask.dim() > 4
                                  or attn_mask.dtype not in (torch.bool, torch.float32)
                                  or attn_mask.device.type != "cpu"):
        return False  # torch raises for a mask together with is_causal; let it say so
    b, h, sq, d = query.shape
    if key.shape[0] != b or value.shape[0] != b or key.shape[-1] != d or value.shape[1:3] != key.shape[1:3]:
        return False
    if attn_mask is not None:   # one that does not broadcast: torch's own error, as a drop-in should give
        full = (b, h, sq, key.shape[2])[4 - attn_mask.dim():]
        if any(m != f and m != 1 for m, f in zip(attn_mask.shape, full)):
            return False
    return key.shape[1] == h or (enable_gqa and key.shape[1] >= 1 and h % key.shape[1] == 0)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (same arguments, same result), in pysparse's CPU kernel where it applies.

    The kernel (``torch.ops.pysparse.attention``) runs float32 CPU tensors ``[batch, heads, seq, dim]`` of any
    strides with no dropout; a bool (True = attend) or float32 mask broadcasting to ``[batch, heads, q_len, kv_len]``
    or ``is_causal``; grouped-query heads with ``enable_gqa``. With gradients wanted for query, key or value it runs
    ``pysparse::attention_forward``, which also keeps each query row's log-sum-exp, and its backward
    ``pysparse::attention_backward`` (a mask that wants a gradient goes to torch). Everything else (CUDA, other
    dtypes, dropout) goes to torch's function, so this is safe to call anywhere. Why it exists: once a
    transformer's Linear layers are block-sparse, the dense attention is most of what is left, and torch's CPU kernel
    runs BERT-size attention (short sequences, head dim 32-64) well below the cores' rate.

    Returns:
        ``[batch, heads, q_len, v_dim]`` as torch's; from the kernel it is a transposed view of a contiguous
        ``[batch, q_len, heads, v_dim]`` tensor, so ``out.transpose(1, 2).reshape(batch, q_len, -1)`` (what
        transformers does next) copies nothing.
    """
    if attention_kernel_applies(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
        return attention_bshd(query, key, value, attn_mask, is_causal, scale).transpose(1, 2)
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                            dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                            **kwargs)


def attention_bshd(query, key, value, attn_mask, is_causal, scale) -> torch.Tensor:
    """pysparse's attention (``[batch, q_len, heads, v_dim]``) for arguments the kernel takes
    (:func:`attention_kernel_applies`): ``pysparse::attention`` below the autograd layer, or, when query, key or
    value wants a gradient, ``pysparse::attention_forward`` through autograd."""
    scale = None if scale is None else float(scale)
    if wants_grad(query, key, value):
        return torch.ops.pysparse.attention_forward(query, key, value, attn_mask, bool(is_causal), scale)[0]
    return call(torch.ops.pysparse.attention.default, query, key, value, attn_mask, bool(is_causal), scale)


@torch.library.register_fake("pysparse::attention")
def _attention_fake(query, key, value, attn_mask=None, is_causal=False, scale=None):
    torch._check(query.dim() == 4 and key.dim() == 4 and value.dim() == 4,
                 lambda: "query, key and value must be 4-D [batch, heads, seq, dim]")
    b, h, sq, _ = query.shape
    return query.new_empty((b, sq, h, value.shape[-1]))


@torch.library.register_fake("pysparse::attention_forward")
def _attention_forward_fake(query, key, value, attn_mask=None, is_causal=False, scale=None):
    b, h, sq, _ = query.shape
    return _attention_fake(query, key, value, attn_mask, is_causal, scale), query.new_empty((b, h, sq))


@torch.library.register_fake("pysparse::attention_backward")
def _attention_backward_fake(grad_out, query, key, value, out, logsumexp, attn_mask=None, is_causal=False,
                             scale=None):
    b, h, sq, d = query.shape
    hk, skv, dv = key.shape[1], key.shape[2], value.shape[3]
    torch._check(tuple(grad_out.shape) == (b, sq, h, dv), lambda: f"grad_out must have shape {(b, sq, h, dv)}, "
                 f"got {tuple(grad_out.shape)}")
    return query.new_empty((b, sq, h, d)), query.new_empty((b, skv, hk, d)), query.new_empty((b, skv, hk, dv))


def _forward_setup_context(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.mark_non_differentiable(lse)


def _forward_backward(ctx, grad_out, _grad_lse):
    query, key, value, attn_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    dq, dk, dv = torch.ops.pysparse.attention_backward(grad_out, query, key, value, out, lse, attn_mask,
                                                        ctx.is_causal, ctx.scale)
    # [B, S, H, D] -> the inputs' [B, H, S, D] (views: transformers' q / k / v are these transposes already).
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None


torch.library.register_autograd("pysparse::attention_forward", _forward_backward,
                                setup_context=_forward_setup_context)


def attention_reference(query, key, value, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """Pure-torch ``pysparse::attention`` in float64 (the test oracle): ``[batch, q_len, heads, v_dim]``; a mask and
    ``is_causal`` both apply; a query row that sees no key gives zeros."""
    q, k, v = (t.double() for t in (query, key, value))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] else 1.0   # as the op: scores are 0 anyway at head dim 0
    scores = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if is_causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key: 0, as torch's kernels give
    return (weights @ v).transpose(1, 2).to(query.dtype)
