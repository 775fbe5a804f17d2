"""Benchmarks users can trust: ``python -m pysparse bench``.

Every point is checked against the dense masked reference before it is timed; pysparse, dense PyTorch and
torch's own sparse path are timed in the same process (median after warm-up; CUDA events on GPU); the
environment (CPU model, ISA path, threads, torch, GPU and CUDA) is recorded with every result.

Modules: ``sweep`` (layer sweep), ``models`` (whole models via ``pysparse.sparsify``), ``timing``, ``check``,
``environment``, ``report`` (table, JSON, CSV), ``plot`` (PNG; needs matplotlib), ``cli`` (the command).
"""
from .cli import add_arguments, main
from .environment import collect as collect_environment
from .models import run_models
from .options import UsageError
from .sweep import LayerCase, cases, run_sweep

__all__ = ["add_arguments", "main", "run_sweep", "run_models", "cases", "LayerCase", "collect_environment",
           "UsageError"]
