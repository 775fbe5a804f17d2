"""``--compare deepsparse``: the pruned dense model of each point (in the layer sweep, one ``nn.Linear``) exported to
ONNX (opset 17), compiled by DeepSparse 1.8 with ``num_cores`` = the run's threads, checked against the same
reference as pysparse, and timed in the same rounds as dense PyTorch and pysparse.

DeepSparse runs in this process when it imports here, else under the interpreter named by ``--deepsparse-python``
or ``PYSPARSE_DEEPSPARSE_PYTHON`` (see :mod:`pysparse.bench.deepsparse_runner` for the protocol). It is a
benchmark-only comparison: not a dependency of pysparse, of its tests or of its CI.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from .check import rel_err
from .deepsparse_runner import Runner
from .options import UsageError

ENV_VAR = "PYSPARSE_DEEPSPARSE_PYTHON"
HOW = ("DeepSparse 1.8 pins numpy 1.26, so give it an environment of its own (Python <= 3.11): "
       "python3.11 -m venv DIR && DIR/bin/pip install deepsparse==1.8.0, then pass --deepsparse-python DIR/bin/python "
       f"or set {ENV_VAR}=DIR/bin/python")
RUNNER = pathlib.Path(__file__).with_name("deepsparse_runner.py")
OPSET = 17


class RunnerError(RuntimeError):
    """The DeepSparse runner failed a request, or died."""


class _Remote:
    """:class:`~pysparse.bench.deepsparse_runner.Runner`'s methods, carried out by the runner script under another
    interpreter (arrays travel as .npy files in ``workdir``)."""

    def __init__(self, python: str, workdir: pathlib.Path):
        self._python, self._workdir = python, workdir
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the runner
        self._proc = subprocess.Popen([python, "-I", str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True, bufsize=1)
        self._greeting = self._read()

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            self._stderr.seek(0)
            tail = " | ".join(self._stderr.read().strip().splitlines()[-3:])
            raise RunnerError(f"the DeepSparse runner under {self._python} exited with code {self._proc.returncode}"
                              + (f": {tail}" if tail else ""))
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise RunnerError(f"the DeepSparse runner under {self._python} answered {line.strip()[:200]!r}, "
                              "not a JSON line") from None
        if not isinstance(message, dict) or message.get("ok") is not True:
            error = message.get("error") if isinstance(message, dict) else None
            raise RunnerError(str(error or f"the DeepSparse runner answered {line.strip()[:200]!r}"))
        return message

    def _request(self, **request) -> dict:
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the runner is gone: _read says how it ended
        return self._read()

    def hello(self) -> dict:
        return {k: v for k, v in self._greeting.items() if k != "ok"}

    def compile(self, model: str, batch_size: int, num_cores: int) -> dict:
        answer = self._request(cmd="compile", model=model, batch_size=batch_size, num_cores=num_cores)
        return {k: v for k, v in answer.items() if k != "ok"}

    def run(self, inputs: list[np.ndarray]) -> np.ndarray:
        paths = []
        for i, array in enumerate(inputs):
            paths.append(str(self._workdir / f"input_{i}.npy"))
            np.save(paths[-1], array)
        output = self._workdir / "output.npy"
        self._request(cmd="run", inputs=paths, output=str(output))
        return np.load(output, allow_pickle=False)

    def time(self, min_run_time: float) -> float:
        return float(self._request(cmd="time", min_run_time=min_run_time)["seconds"])

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # end of input: the runner exits
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        self._stderr.close()


class DeepSparse:
    """DeepSparse for one bench run: ``python`` None runs it in this process, else under that interpreter."""

    def __init__(self, python: str | None, threads: int):
        self.threads = threads
        self._dir = tempfile.TemporaryDirectory(prefix="pysparse-deepsparse-")
        self.workdir = pathlib.Path(self._dir.name)
        try:
            self._runner = Runner() if python is None else _Remote(python, self.workdir)
        except BaseException:
            self._dir.cleanup()
            raise
        # what the environment record keeps: versions, where it ran, its thread count
        self.info = {**self._runner.hello(), "python_path": python or "in-process", "num_cores": threads}

    def close(self) -> None:
        if isinstance(self._runner, _Remote):
            self._runner.close()
        self._dir.cleanup()

    def measure(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], want: torch.Tensor, *, tolerance: float,
                min_run_time: float, scale: float | None = None):
        """Export ``module`` (called as ``module(*inputs)``), compile and run it; compare its output with ``want``
        (:func:`~pysparse.bench.check.rel_err` with ``scale``). Returns the row's ``deepsparse_*`` fields and, when
        the result is right, a timer (no arguments; milliseconds per call on the same inputs), else None."""
        fields = dict(deepsparse_ms=None, deepsparse_rel_err=None, deepsparse_note="")
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in inputs):
            fields["deepsparse_note"] = "DeepSparse runs float32 models only here"
            return fields, None
        path = self.workdir / "model.onnx"
        try:
            export_onnx(module, inputs, path)
            self._runner.compile(str(path), int(inputs[0].shape[0]), self.threads)
            got = self._runner.run([t.detach().cpu().numpy() for t in inputs])
        except Exception as exc:  # noqa: BLE001 - an export or engine failure costs this point's column only
            fields["deepsparse_note"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            return fields, None
        finally:
            path.unlink(missing_ok=True)  # the engine holds the model now; a ResNet-50 file is ~100 MB
        got = np.asarray(got)
        if got.size != want.numel():
            fields["deepsparse_note"] = f"output of shape {got.shape}, expected {tuple(want.shape)}; not timed"
            return fields, None
        err = rel_err(torch.from_numpy(got).reshape(want.shape), want, scale)
        fields["deepsparse_rel_err"] = err
        if not err < tolerance:
            fields["deepsparse_note"] = f"wrong result (rel. err {err:.1e} >= {tolerance:g}), not timed"
            return fields, None
        return fields, lambda: self._runner.time(min_run_time) * 1e3


def export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], path) -> None:
    """``module(*inputs)`` as an ONNX graph (opset 17, TorchScript exporter) with inputs ``input_0``, ... in order."""
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter's deprecation notice and tracer warnings: nothing to act on here
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs), str(path), opset_version=OPSET,
                          input_names=[f"input_{i}" for i in range(len(inputs))], output_names=["output"],
                          dynamo=False)


def open_deepsparse(python: str | None, threads: int) -> DeepSparse:
    """DeepSparse under ``python`` (else ``$PYSPARSE_DEEPSPARSE_PYTHON``, else in this process); a
    :class:`UsageError` that says how to provide it when it cannot run."""
    if importlib.util.find_spec("onnx") is None:
        raise UsageError("--compare deepsparse exports the model to ONNX, which needs the onnx package: "
                         "pip install 'torch-pysparse[bench]' (or pip install onnx)")
    python = python or os.environ.get(ENV_VAR) or None
    if python is None:
        if importlib.util.find_spec("deepsparse") is None:
            raise UsageError(f"--compare deepsparse: deepsparse does not import here and no interpreter that has it "
                             f"was named. {HOW}")
    elif shutil.which(python) is None:
        raise UsageError(f"--deepsparse-python (or {ENV_VAR}): expected the path of a Python interpreter that has "
                         f"deepsparse, got {python!r}, which is not an executable file")
    else:
        python = shutil.which(python)
    try:
        return DeepSparse(python, threads)
    except Exception as exc:  # noqa: BLE001 - whatever stops deepsparse from starting, the user is told how to fix it
        raise UsageError(f"--compare deepsparse: {exc}. {HOW}") from None
