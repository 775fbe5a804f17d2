"""The binary records the torch / CUDA it was built for, and a mismatched runtime is refused with one message."""
import re

import pytest
import torch

import pysparse
from pysparse import _build_info, _runtime_check


def test_version_records_build():
    assert re.fullmatch(r"\d+\.\d+\.\d+\+(cu\d+|cpu)torch\d+\.\d+", pysparse.__version__), pysparse.__version__
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert pysparse.__version__.endswith(f"torch{torch_mm}")
    if _build_info.WITH_CUDA:
        assert f"+cu{_build_info.CUDA_VERSION.replace('.', '')}" in pysparse.__version__


def test_current_runtime_accepted():
    _runtime_check.check_runtime_matches_build()


def test_torch_mismatch_refused(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.13.0")
    with pytest.raises(ImportError, match=r"built for a different runtime.*torch 1\.13\.0 at build time"):
        _runtime_check.check_runtime_matches_build()


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_cuda_mismatch_refused(monkeypatch):
    monkeypatch.setattr(_build_info, "WITH_CUDA", True)
    monkeypatch.setattr(_build_info, "CUDA_VERSION", "9.2")
    with pytest.raises(ImportError, match=r"CUDA 9\.2 at build time"):
        _runtime_check.check_runtime_matches_build()
