"""Hugging Face transformers models' attention in pysparse's CPU kernel
(:func:`pysparse.ops.scaled_dot_product_attention`).

transformers (v5, and 4.48 on) looks up a model's attention function by name (``config._attn_implementation``) in a
registry, ``AttentionInterface``, and the mask builder for it in ``AttentionMaskInterface``.
:func:`use_pysparse_attention` registers the name ``"pysparse_sdpa"`` in both (the mask is SDPA's: bool, True = attend)
and switches a model that runs ``"sdpa"`` to it. The function runs pysparse's kernel where it applies (float32 on the
CPU, no attention dropout; in training its forward and backward) and hands every other call (CUDA, attention dropout,
other dtypes, position biases, soft-capping) to transformers' own SDPA function, so the model computes what it
computed before. Why: once the Linear layers are 90%
block-sparse, attention is the largest cost left in a BERT-size encoder, and torch's CPU kernel runs it well below the
cores' rate.
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..ops.attention import attention_bshd, attention_kernel_applies

__all__ = ["ATTENTION_NAME", "attention_implementation", "pysparse_attention_while", "use_pysparse_attention"]

ATTENTION_NAME = "pysparse_sdpa"


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers' attention-function signature: q / k / v ``[batch, heads, seq, dim]``; returns
    ``([batch, q_len, heads, v_dim], None)`` as its SDPA function does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (not kwargs.get("output_attentions") and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None):
        # transformers' SDPA rule: causal only when the module is, with no explicit mask and more than one query.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and attention_mask is None and query.shape[2] > 1
        gqa = key.shape[1] != query.shape[1]
        if attention_kernel_applies(query, key, value, attention_mask, dropout, causal, enable_gqa=gqa):
            return attention_bshd(query, key, value, attention_mask, causal, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _register() -> str | None:
    """Registers the attention and mask functions with transformers; None, or why it cannot."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:  # not installed, or a release without the registries
        return f"transformers' attention registry is not available ({e})"
    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return None


def attention_implementation(model: nn.Module) -> str | None:
    """The attention a transformers model runs (``config._attn_implementation``), None for other modules."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def use_pysparse_attention(model: nn.Module) -> str:
    """Switch a transformers model (a ``PreTrainedModel``) whose attention runs ``"sdpa"`` to pysparse's kernel.

    In place. Models with another attention (eager, flash, flex, a custom one) and modules that are not transformers
    models are left as they are. Returns what happened, in words (``sparsify`` puts it in its report).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    current = attention_implementation(model)
    if current == ATTENTION_NAME:
        return f"attention: pysparse CPU kernel ({ATTENTION_NAME}), already set"
    if not hasattr(model, "set_attn_implementation") or current is None:
        return "attention: unchanged (not a transformers model)"
    if current != "sdpa":
        return f"attention: unchanged (the model runs {current!r}; only 'sdpa' is switched)"
    why_not = _register()
    if why_not is not None:
        return f"attention: unchanged ({why_not})"
    model.set_attn_implementation(ATTENTION_NAME)
    return f"attention: pysparse CPU kernel ({ATTENTION_NAME}) instead of 'sdpa' (others fall back to 'sdpa')"


@contextlib.contextmanager
def pysparse_attention_while(model: nn.Module):
    """:func:`use_pysparse_attention` inside the block, ``model``'s own attention restored after (on error too).

    For a model used for a while, such as a distillation teacher under ``no_grad`` or a student trained without
    attention dropout: the results and gradients are SDPA's within float32 rounding, and the model is left as it was
    given.
    """
    before = attention_implementation(model)
    use_pysparse_attention(model)
    try:
        yield model
    finally:
        if before is not None and attention_implementation(model) != before:
            model.set_attn_implementation(before)
