"""The DeepSparse side of ``python -m pysparse bench --compare deepsparse``: compile an ONNX model, run it, time it.

DeepSparse 1.8 pins numpy 1.26, so it usually lives in an environment of its own. This file therefore needs only
the standard library, numpy and deepsparse (no torch, no pysparse): the bench command imports it when deepsparse
imports next to pysparse, and otherwise runs it as a script under the other environment's interpreter
(``--deepsparse-python``; ``-I`` keeps that interpreter's own packages first and this folder off its path).

Protocol of the script (one JSON object per line; stdout carries nothing else, library output goes to stderr):

    runner -> {"ok": true, "deepsparse": VERSION, "numpy": VERSION, "python": VERSION, "protocol": 1}   once, at start
    -> {"cmd": "compile", "model": ONNX_PATH, "batch_size": B, "num_cores": T}
    <- {"ok": true, "num_cores": T, "cpu_avx_type": "avx2"}
    -> {"cmd": "run", "inputs": [NPY_PATH, ...], "output": NPY_PATH}     the engine's first output is saved there
    <- {"ok": true}
    -> {"cmd": "time", "min_run_time": SECONDS}                          the inputs of the last "run", repeated
    <- {"ok": true, "seconds": MEDIAN_SECONDS_PER_CALL}
    any failure: {"ok": false, "error": "..."}; end of input: the runner exits.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import numpy as np

PROTOCOL = 1


def median_seconds(fn, min_run_time: float) -> float:
    """Median seconds per ``fn()`` as torch.utils.benchmark's ``blocked_autorange`` measures it (which times the
    dense and pysparse variants): one warm-up call, blocks of 1, 10, 100 ... calls until a block lasts
    ``min_run_time / 1000``, then blocks until ``min_run_time`` has passed; the median of the blocks."""
    fn()
    number = 1
    while True:
        block = _block(fn, number)
        if block >= min_run_time / 1000 or block > min_run_time:
            break
        number *= 10
    times, total = [], 0.0
    while total < min_run_time:
        block = _block(fn, number)
        times.append(block / number)
        total += block
    return statistics.median(times)


def _block(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return time.perf_counter() - start


class Runner:
    """One DeepSparse engine at a time, compiled for a batch size and thread count."""

    def __init__(self):
        import deepsparse  # here, not at the top: importing this file must not need deepsparse

        self._deepsparse = deepsparse
        self._engine = None
        self._inputs = None

    def hello(self) -> dict:
        return {"deepsparse": self._deepsparse.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "protocol": PROTOCOL}

    def compile(self, model: str, batch_size: int, num_cores: int) -> dict:
        self._engine = self._inputs = None  # free the previous engine before compiling the next
        self._engine = self._deepsparse.Engine(model=model, batch_size=batch_size, num_cores=num_cores)
        return {"num_cores": self._engine.num_cores, "cpu_avx_type": str(self._engine.cpu_avx_type)}

    def run(self, inputs: list[np.ndarray]) -> np.ndarray:
        if self._engine is None:
            raise RuntimeError("'run' before 'compile'")
        self._inputs = [np.ascontiguousarray(a) for a in inputs]
        return self._engine(self._inputs)[0]

    def time(self, min_run_time: float) -> float:
        if self._inputs is None:
            raise RuntimeError("'time' before 'run'")
        engine, inputs = self._engine, self._inputs
        return median_seconds(lambda: engine(inputs), min_run_time)


def _handle(runner: Runner, request: dict) -> dict:
    cmd = request.get("cmd")
    if cmd == "compile":
        return runner.compile(str(request["model"]), int(request["batch_size"]), int(request["num_cores"]))
    if cmd == "run":
        np.save(request["output"], runner.run([np.load(p, allow_pickle=False) for p in request["inputs"]]))
        return {}
    if cmd == "time":
        return {"seconds": runner.time(float(request["min_run_time"]))}
    raise ValueError(f"unknown cmd {cmd!r}; expected 'compile', 'run' or 'time'")


def serve(requests, reply) -> None:
    """Answer each JSON line of ``requests`` with one JSON line through ``reply(dict)``, after a greeting."""
    try:
        runner = Runner()
    except Exception as exc:  # noqa: BLE001 - the caller shows why DeepSparse is not usable here
        reply({"ok": False, "error": f"cannot import deepsparse: {type(exc).__name__}: {exc}"})
        return
    reply({"ok": True, **runner.hello()})
    for line in requests:
        if not line.strip():
            continue
        try:
            answer = {"ok": True, **_handle(runner, json.loads(line))}
        except Exception as exc:  # noqa: BLE001 - one failed request is an answer, not the end of the runner
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply(answer)


def main() -> None:
    # The protocol gets a private copy of stdout; fd 1 then points at stderr, so that whatever deepsparse or its
    # native code prints cannot corrupt the JSON lines.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def reply(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    serve(sys.stdin, reply)


if __name__ == "__main__":
    main()
