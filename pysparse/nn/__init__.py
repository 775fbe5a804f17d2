"""Drop-in layers that hold packed sparse weights and run pysparse kernels."""
from .channel_sparse import ChannelSparseConv2d, ChannelSparseLinear
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear", "ChannelSparseLinear", "ChannelSparseConv2d"]
