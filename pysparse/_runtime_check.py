"""Refuses, with one clear message, a torch or CUDA at run time that differs from the one the binary was built for."""
import torch


def check_runtime_matches_build() -> None:
    try:
        from . import _build_info
    except ImportError as exc:  # a source tree that was never built
        raise ImportError("pysparse is not built: run `pip install --no-build-isolation -e .` in the source tree "
                          "(after installing torch)") from exc
    runtime_torch = torch.__version__.split("+")[0]
    built_mm = ".".join(_build_info.TORCH_VERSION.split(".")[:2])
    runtime_mm = ".".join(runtime_torch.split(".")[:2])
    problems = []
    if built_mm != runtime_mm:
        problems.append(f"torch {_build_info.TORCH_VERSION} at build time, torch {runtime_torch} now")
    if _build_info.WITH_CUDA and torch.version.cuda is not None:
        built_cuda = _build_info.CUDA_VERSION.split(".")[0]
        if built_cuda != torch.version.cuda.split(".")[0]:
            problems.append(f"CUDA {_build_info.CUDA_VERSION} at build time, torch's CUDA {torch.version.cuda} now")
    if problems:
        raise ImportError(f"pysparse {_build_info.VERSION} was built for a different runtime ("
                          + "; ".join(problems) + "). Rebuild it: pip install --no-build-isolation -e . "
                          "(or install the wheel built for this torch/CUDA)")
