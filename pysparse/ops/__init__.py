"""Custom ops (namespace ``pysparse``), one module per op family: each holds its documented wrapper, its fake kernel
for ``torch.compile``, its backward where it has one, and a pure-torch reference that doubles as the test oracle.

The compiled library ``pysparse._C`` registers the op schemas and the CPU/CUDA kernels with the dispatcher.
:mod:`.layer_support` holds what the wrappers and ``pysparse.nn``'s layers share (internal).
"""
from __future__ import annotations

import torch

from .. import _C
from .._build_info import WITH_CUDA
from . import autocast  # noqa: F401  (registers the ops' torch.autocast behaviour)
from .attention import attention_kernel_applies, attention_reference, scaled_dot_product_attention
from .bsr_conv2d import bsr_conv2d_nhwc, bsr_conv2d_nhwc_reference, implicit_conv2d_available
from .bsr_linear_op import (bsr_linear, bsr_linear_packed, bsr_linear_reference, cpu_reads_transposed,
                            is_block_transposed, kernel_layout)
from .cpu_path import CPU_PATHS, cpu_paths, current_cpu_path, force_cpu_path
from .channel import (channel_sparse_conv2d, channel_sparse_conv2d_reference, channel_sparse_linear,
                      channel_sparse_linear_reference)
from .layer_support import ACTIVATIONS
from .unstructured_linear import (kernel_block_cols, unstructured_linear, unstructured_linear_packed,
                                  unstructured_linear_reference)

__all__ = ["bsr_linear", "bsr_linear_packed", "bsr_linear_reference", "available_backends", "ACTIVATIONS",
           "cpu_reads_transposed", "kernel_layout", "is_block_transposed",
           "bsr_conv2d_nhwc", "bsr_conv2d_nhwc_reference", "implicit_conv2d_available",
           "channel_sparse_linear", "channel_sparse_linear_reference", "channel_sparse_conv2d",
           "channel_sparse_conv2d_reference",
           "scaled_dot_product_attention", "attention_reference", "attention_kernel_applies",
           "unstructured_linear", "unstructured_linear_packed", "unstructured_linear_reference", "kernel_block_cols",
           "CPU_PATHS", "cpu_paths", "current_cpu_path", "force_cpu_path"]


def available_backends() -> dict:
    """What this build runs: ``{"cpu": <ISA path>, "cuda": bool}`` ("cuda" needs a CUDA build and a device)."""
    return {
        "cpu": _C.cpu_isa(),
        "cuda": bool(WITH_CUDA and torch.cuda.is_available()),
        "cuda_built": bool(WITH_CUDA),
    }
