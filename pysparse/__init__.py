"""pysparse: block- and channel-sparse PyTorch layers with CPU and CUDA kernels.

prune -> formats -> nn -> ops -> csrc: masks become packed weights become drop-in layers that run custom kernels;
transforms (sparsify, fold_batchnorm, fusions) rewrite whole models with those layers.
"""
from ._runtime_check import check_runtime_matches_build

check_runtime_matches_build()

from . import analysis, formats, nn, ops, prune, transforms  # noqa: E402
from ._build_info import VERSION as __version__  # noqa: E402
from .io import load, save  # noqa: E402
from .transforms.fold_batchnorm import fold_batchnorm  # noqa: E402
from .transforms.sparsify import sparsify  # noqa: E402

__all__ = ["analysis", "formats", "nn", "ops", "prune", "transforms", "sparsify", "fold_batchnorm", "save", "load",
           "__version__"]
