"""Forcing the CPU kernel path from Python: a hook for tests and benchmarks.

The library picks its CPU path when it loads (the best instruction set the CPU runs; ``PYSPARSE_CPU_ISA`` and
``PYSPARSE_CPU_BCAST`` can lower it for a whole process). :func:`force_cpu_path` switches it inside one process, so
that a benchmark can alternate the default with every compiled path in the same run. Users never need it: the
default path is the one the kernels were tuned for on each CPU.
"""
from __future__ import annotations

import contextlib

from .. import _C
from .bsr_conv2d import refresh_implicit_conv2d

__all__ = ["CPU_PATHS", "cpu_paths", "current_cpu_path", "force_cpu_path", "path_request"]

# The compiled paths, by name, with the library's id of each. "avx512bf16" is "avx512" with vdpbf16ps for bfloat16
# weights (chosen by default only on AMD, where it is faster than widening bfloat16 to float32); "avx512amx" is
# "avx512" with AMX tiles for bfloat16 blocks (the default where the CPU has them: Intel Sapphire Rapids and later).
CPU_PATHS = {"generic": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3, "avx512amx": 4}
_NAMES = {v: k for k, v in CPU_PATHS.items()}


def cpu_paths() -> list[str]:
    """The paths of :data:`CPU_PATHS` this CPU runs, lowest first."""
    return [name for name, isa in CPU_PATHS.items() if _C.cpu_isa_supported(isa)]


def current_cpu_path() -> tuple[str, bool]:
    """``(path, broadcast kernel on)`` that the next CPU kernel call runs on."""
    isa, bcast = _C.cpu_path()
    return _NAMES[isa], bool(bcast)


def path_request(isa: str | None = None, broadcast: bool | None = None) -> tuple[int, int]:
    """``(isa id, broadcast)`` as the library takes them (-1: the default), after checking both (see
    :func:`force_cpu_path`). Benchmarks that switch per call pass it to ``_C.force_cpu_path`` directly."""
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"isa must be a path name or None, got {type(isa).__name__}")
    if isa is not None and isa not in CPU_PATHS:
        raise ValueError(f"isa must be one of {sorted(CPU_PATHS)} or None, got {isa!r}")
    if isa is not None and isa not in cpu_paths():
        raise ValueError(f"isa={isa!r} is not a path this CPU runs; it runs {cpu_paths()}")
    if broadcast is not None and not isinstance(broadcast, bool):
        raise TypeError(f"broadcast must be a bool or None, got {type(broadcast).__name__}")
    return -1 if isa is None else CPU_PATHS[isa], -1 if broadcast is None else int(broadcast)


@contextlib.contextmanager
def force_cpu_path(isa: str | None = None, *, broadcast: bool | None = None):
    """Run the CPU kernels on path ``isa`` (a name of :func:`cpu_paths`; ``None``: the path chosen at load) with the
    broadcast kernel on, off, or (``None``) at the path's default, until the block exits; the previous setting is
    then restored. A test and benchmark hook, process-wide (every thread's next call runs the forced path; a call
    never mixes two).

    Weights packed inside the block get the layout the forced path reads (``SparseLinear.from_dense``); a layer
    packed under another path still computes the same result, through a per-call copy of its values where the
    layouts differ, so time each path on layers packed under it.
    """
    request = path_request(isa, broadcast)
    previous = _C.cpu_path_request()
    if not _C.force_cpu_path(*request):
        raise ValueError(f"the library refused the CPU path isa={isa!r}, broadcast={broadcast!r}")
    refresh_implicit_conv2d()
    try:
        yield current_cpu_path()
    finally:
        _C.force_cpu_path(*previous)
        refresh_implicit_conv2d()
