"""Drop-in layers that hold packed sparse weights and run pysparse kernels."""
from .channel_sparse import ChannelSparseConv2d, ChannelSparseLinear
from .sparse_conv import SparseConv2d, conv_weight_from_matrix, conv_weight_matrix
from .sparse_linear import SparseLinear, UnstructuredSparseLinear

__all__ = ["SparseConv2d", "SparseLinear", "UnstructuredSparseLinear", "conv_weight_from_matrix", "conv_weight_matrix",
           "ChannelSparseLinear", "ChannelSparseConv2d", "use_pysparse_attention"]


def __getattr__(name: str):
    # use_pysparse_attention lives in pysparse.transforms.attention_switch (it rewrites a model, it is no layer) and
    # has always been public here too. transforms sits above nn (transforms -> nn -> ops), so it is imported on
    # first use rather than at import time.
    if name == "use_pysparse_attention":
        from ..transforms.attention_switch import use_pysparse_attention
        return use_pysparse_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
