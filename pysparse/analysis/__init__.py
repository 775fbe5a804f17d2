"""Tools that combine pruning with packing and measured speed: reports and sensitivity analysis.

They sit above pysparse.prune, formats and nn in the data flow and may import all of them.
"""
from .reports import LayerStats, SparsityReport, sparsity_report
from .sensitivity import SensitivityResult, SensitivityRow, pack_block_size, sensitivity
from .timing import median_seconds

__all__ = ["sparsity_report", "SparsityReport", "LayerStats", "sensitivity", "SensitivityResult", "SensitivityRow",
           "pack_block_size", "median_seconds"]
