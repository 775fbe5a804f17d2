"""Drop-in layers that hold packed sparse weights and run pysparse kernels."""
from .channel_sparse import ChannelSparseConv2d, ChannelSparseLinear
from .sparse_conv import SparseConv2d, conv_weight_from_matrix, conv_weight_matrix
from .sparse_linear import SparseLinear
from .transformers_attention import use_pysparse_attention

__all__ = ["SparseConv2d", "SparseLinear", "conv_weight_from_matrix", "conv_weight_matrix", "ChannelSparseLinear",
           "ChannelSparseConv2d", "use_pysparse_attention"]
