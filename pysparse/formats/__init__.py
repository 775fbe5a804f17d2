"""Packed sparse weight formats. Each class validates its indices once (at pack or load); kernels trust it."""
from .block_sparse import BlockSparseWeight

__all__ = ["BlockSparseWeight"]
