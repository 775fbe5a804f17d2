"""How the benchmarks time: CPU through :func:`pysparse.analysis.median_seconds`, CUDA through CUDA events.

On CUDA, ``R`` back-to-back calls are captured in a CUDA graph (launch gaps amortised) and the median of several
replays, timed with events, is taken. Callers pass several functions that read different copies of the weight
(see :func:`copies_for`) so small-batch numbers measure memory streaming, not a warm L2 cache.
"""
from __future__ import annotations

import math
import statistics

import torch

from ..analysis import median_seconds


def time_calls(fns, reps, replays=7, use_graph=True):
    """Median milliseconds per call of running fns[i % len(fns)] for i in range(reps)."""
    for f in fns[:3]:
        f()
    torch.cuda.synchronize()
    graph = None
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for f in fns[:2]:
                    f()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(reps):
                    fns[i % len(fns)]()
        except Exception:  # a path that synchronises or allocates on the host cannot be captured
            graph = None
            torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for i in range(reps):
                fns[i % len(fns)]()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / reps)
    return statistics.median(times), graph is not None


def copies_for(nbytes, l2_bytes):
    """How many copies of an ``nbytes`` operand to rotate through so that they overflow the L2 cache 4 times."""
    return max(2, min(64, math.ceil(4 * l2_bytes / max(nbytes, 1))))


def l2_bytes() -> int:
    """The current GPU's L2 cache size (50 MiB where torch does not report it)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "L2_cache_size", 50 * 2**20)


def alternate(timers: dict, rounds: int) -> dict:
    """The median over ``rounds`` of what each ``timers[name]()`` returns (milliseconds), the timers called in turn
    in every round, so that drift in the machine's load hits all variants alike."""
    times = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_ms(fns, device: str, *, min_run_time: float, reps: int = 100) -> float:
    """Median milliseconds per call: ``fns[0]`` on the CPU (the copies buy nothing there and cost memory), the
    rotation over ``fns`` on CUDA (``reps`` calls per timed replay)."""
    if device == "cuda":
        with torch.no_grad():
            return time_calls(fns, reps)[0]
    return median_seconds(fns[0], min_run_time=min_run_time) * 1e3
