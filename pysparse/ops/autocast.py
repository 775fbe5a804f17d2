"""``torch.autocast`` for pysparse's ops: inside an autocast region each op casts its floating-point inputs first, as
torch's own ops do, so a model that mixes dense and packed layers runs under mixed precision (without this, a packed
layer after an autocast ``nn.Linear`` got bfloat16 activations against its float32 weights and refused them).

Ops with 16-bit kernels (the block-sparse and channel-sparse products) run in the region's dtype: on CPUs with AMX,
bfloat16 blocks run on its tiles, and the float32 weights are cast per call (their gradients flow back to the
float32 parameters, the usual mixed-precision training). Ops whose CPU kernels are float32 only (unstructured,
implicit-im2col convolution, attention) run in float32, as torch's float32-list ops do, instead of falling back to a
slow 16-bit reference.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers torch.ops.pysparse.*)

__all__ = ["AUTOCAST_POLICY"]

# op -> "lower" (the region's dtype) or "float32". The backward ops run outside autocast (autograd does not apply it).
AUTOCAST_POLICY = {
    "bsr_linear": "lower",
    "bsr_linear_act": "lower",
    "channel_sparse_linear": "lower",
    "channel_sparse_conv2d": "lower",
    "unstructured_linear": "float32",
    "unstructured_linear_act": "float32",
    "bsr_conv2d_nhwc": "float32",
    "attention": "float32",
    "attention_forward": "float32",
}

_LIB = torch.library.Library("pysparse", "IMPL")


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def _register(name: str, policy: str, device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = getattr(torch.ops.pysparse, name).default

    def run(*args):
        dtype = torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(_cast(a, dtype) for a in args))

    if op.has_kernel_for_dispatch_key(key):  # the Python dispatcher's copy (torch.compile traces through it)
        op.py_kernels.pop(key, None)
    op.py_impl(key)(run)
    _LIB.impl(name, lambda _keyset, *args: run(*args), key_name, with_keyset=True)


for _name, _policy in AUTOCAST_POLICY.items():
    for _device in ("cpu", "cuda"):
        if torch._C._is_autocast_available(_device):
            _register(_name, _policy, _device)
