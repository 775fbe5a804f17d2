"""One way to time a callable, shared by the demo, the sensitivity analysis, the bench command and the examples."""
from __future__ import annotations

import statistics

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


def alternating_medians(fns: dict, *, rounds: int = 3, min_run_time: float = 0.2) -> dict:
    """Median seconds per call of each ``fns[name]()``, timed one after another ``rounds`` times and the median of
    the rounds kept, so drift in the machine's load hits every variant alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_seconds(fn, min_run_time=min_run_time))
    return {name: statistics.median(t) for name, t in times.items()}
