"""What a result was measured on: recorded with every benchmark, so a number never travels without its machine."""
from __future__ import annotations

import datetime
import os
import platform

import torch

from .. import ops
from .._build_info import VERSION


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of ``/proc/cpuinfo`` (Linux), None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``; ``unknown`` off Linux)."""
    return _cpuinfo("vendor_id") or "unknown"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (as ``uptime`` shows them): a busy machine makes every time longer."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def collect(device: str) -> dict:
    """The environment of a run on ``device`` ("cpu" or "cuda"); GPU fields only where CUDA is used."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pysparse": VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_isa": ops.available_backends()["cpu"],  # the ISA path pysparse's CPU kernel dispatched to
        "threads": torch.get_num_threads(),
        "device": device,
        "load_average": load_average(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def describe(env: dict) -> str:
    """One line for table and plot headers."""
    where = f"{env['gpu']} (CUDA {env['cuda']})" if env.get("gpu") else f"{env['cpu']}, {env['threads']} thread(s)"
    load = env.get("load_average")
    deepsparse = f", DeepSparse {env['deepsparse']}" if env.get("deepsparse") else ""
    return (f"{where}, CPU path {env['cpu_isa']!r}, torch {env['torch']}, pysparse {env['pysparse']}{deepsparse}, "
            f"{env['date'][:10]}" + (f", load {load[0]:.2f}" if load else ""))
