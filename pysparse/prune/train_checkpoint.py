"""Training checkpoints that nothing unpickles: one safetensors file holding every tensor (model state with its
masks, optimizer state, RNG states) and, in its metadata, a JSON document for the rest (step, optimizer
hyper-parameters, scheduler state, history), with tensors referenced by key.

Nested dicts, lists and tuples of tensors, numpy arrays and JSON scalars round-trip exactly: a dict keeps its
key types (an optimizer state is keyed by int), a tuple stays a tuple.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["load_training_state", "rng_states", "save_training_state", "set_rng_states"]

_FORMAT = "pysparse.training_state/1"


def _encode(obj, key: str, tensors: dict):
    """``obj`` as JSON-able data, its tensors moved into ``tensors`` under keys derived from ``key``."""
    if isinstance(obj, torch.Tensor):
        # A clone per entry: safetensors refuses tensors that share storage (tied weights, views).
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.copy())
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        for k in obj:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"cannot checkpoint {key}: dict key {k!r} is not a str or int")
        return {"__dict__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (tuple, list)):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot checkpoint {key}: {type(obj).__name__} is not a tensor, array, dict, list, tuple or "
                    f"JSON scalar")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_training_state(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (nested dicts / lists / tuples of tensors, arrays and JSON scalars) to ``path`` atomically
    (a temporary file renamed over it, so a run killed mid-write leaves the previous checkpoint intact)."""
    tensors: dict[str, torch.Tensor] = {}
    document = _encode(state, "state", tensors)
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={"format": _FORMAT, "state": json.dumps(document)})
    os.replace(tmp, path)


def load_training_state(path: str | os.PathLike) -> dict:
    """The ``state`` that :func:`save_training_state` wrote to ``path`` (tensors on the CPU)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a pysparse training checkpoint (format {metadata.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return _decode(json.loads(metadata["state"]), tensors)


def rng_states(generator: torch.Generator | None = None) -> dict:
    """The states of torch's CPU (and CUDA) generators, Python's and numpy's, and ``generator``'s if given."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["generator"] = generator.get_state()
    return states


def set_rng_states(states: dict, generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "generator" in states:
        generator.set_state(states["generator"])

