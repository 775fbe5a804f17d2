"""One way to time a callable, shared by the demo and the sensitivity analysis."""
from __future__ import annotations

import torch


def median_seconds(fn, *args, min_run_time: float = 0.2) -> float:
    """Median seconds per ``fn(*args)`` over repeated runs after warm-up (torch.utils.benchmark), using torch's
    current thread count (Timer alone would default to one thread)."""
    # Imported here: torch.utils.benchmark pulls in cpp_extension, which warns about CUDA on import.
    from torch.utils import benchmark

    with torch.no_grad():
        fn(*args)  # warm-up: first-call allocations and lazy initialisation
        timer = benchmark.Timer("fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median
