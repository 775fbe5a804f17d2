"""Drop-in layers that hold packed sparse weights and run pysparse kernels."""
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear"]
