"""Shared by the checkpoint tests: re-save an edited checkpoint, and check that a refused load raised ValueError and
left the model exactly as it was."""
from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

from pysparse.io import load
from pysparse.prune import channel_surgery_record


def rewrite(path, out, edit_tensors=None, edit_meta=None):
    """Re-save a checkpoint (a valid safetensors container) after editing its tensors and/or metadata:
    ``edit_meta`` edits the parsed pysparse metadata in place, or returns a dict: the raw metadata to write."""
    with safetensors.safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["pysparse"])
    if edit_tensors:
        edit_tensors(tensors)
    raw = edit_meta(meta) if edit_meta else None
    if not isinstance(raw, dict):
        raw = {"pysparse": json.dumps(meta), "format": "pt"}
    safetensors.torch.save_file(tensors, str(out), metadata=raw)
    return out


def snapshot(model):
    """Everything a failed load must leave as it was: tensors, module types and sizes, the surgery record."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, repr(model), channel_surgery_record(model))


def unchanged(model, snap) -> bool:
    state, text, record = snap
    now = model.state_dict()
    return (state.keys() == now.keys() and all(torch.equal(v, now[k]) for k, v in state.items())
            and repr(model) == text and channel_surgery_record(model) == record)


def assert_load_refused(model, path, match: str | None = None) -> None:
    """``load(model, path)`` raises ValueError (matching ``match``) and leaves ``model`` unchanged."""
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load(model, path)
    assert unchanged(model, snap)
