"""Packed sparse weight formats. Each class validates its indices once (at pack or load); kernels trust it."""
from .block_sparse import BlockSparseWeight
from .channel_sparse import ChannelSparseWeight
from .unstructured import UnstructuredSparseWeight

__all__ = ["BlockSparseWeight", "ChannelSparseWeight", "UnstructuredSparseWeight"]
