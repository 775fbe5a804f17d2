"""Every CPU kernel path this machine runs (generic, AVX2, AVX-512), forced with PYSPARSE_CPU_ISA, with and without
the broadcast kernel (PYSPARSE_CPU_BCAST), against the dense reference: float32 / bfloat16 / float16, the
block shapes the SIMD kernels specialise and odd ones, ragged M (register-tile and small-M tails), ragged K / N
(padding filled with NaN, which must be ignored), empty rows, fully dense and fully empty weights, strided inputs,
and concurrent calls from several Python threads.

The path is chosen once when the library loads, so each path runs in its own interpreter (this file, run as a
script with --worker); the test asks that interpreter which path it got and skips paths the CPU lacks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PATHS = ("generic", "avx2", "avx512")
# Each SIMD path with its default broadcast-kernel setting (on) and with it forced off.
PATH_VARIANTS = [(isa, "") for isa in PATHS] + [("avx2", "0"), ("avx512", "0")]


def _run_worker(isa: str, *args: str, bcast: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYSPARSE_CPU_ISA=isa, PYSPARSE_CPU_BCAST=bcast)
    return subprocess.run([sys.executable, __file__, "--worker", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa,bcast", PATH_VARIANTS)
def test_isa_path_matches_reference(isa, bcast):
    report = _last_json(_run_worker(isa, bcast=bcast))
    if report["isa"] != isa:  # the library fell back: this CPU lacks the path
        pytest.skip(f"this CPU cannot run the {isa} path (got {report['isa']})")
    # SparseLinear's layout follows the switch: block-transposed exactly where the broadcast kernel runs.
    expect_transposed = {"": isa != "generic", "0": False, "1": isa != "generic"}[bcast]
    assert report["reads_transposed_32x32"] == expect_transposed
    assert report["checked"] > 100
    assert not report["failures"], "\n".join(report["failures"][:20])


def test_bad_isa_request_warns_and_falls_back():
    proc = _run_worker("no-such-isa", "--which")
    assert "PYSPARSE_CPU_ISA must be generic, avx2 or avx512, got 'no-such-isa'" in proc.stderr
    assert _last_json(proc)["isa"] in PATHS


def test_bad_bcast_request_warns_and_keeps_the_default():
    proc = _run_worker("avx2", "--which", bcast="yes")
    assert "PYSPARSE_CPU_BCAST must be 0 or 1, got 'yes'" in proc.stderr
    report = _last_json(proc)
    assert report["reads_transposed_32x32"] == (report["isa"] != "generic")


# ---- worker (runs in a subprocess with PYSPARSE_CPU_ISA set) ------------------------------------------------


def _random_bsr(torch, n, k, bh, bw, density, dtype, gen):
    """Random BSR parts with empty rows (every third block row) and NaN in the padding past n / k."""
    n_br, n_bc = -(-n // bh), -(-k // bw)
    keep = torch.rand(n_br, n_bc, generator=gen) < density
    if 0.0 < density < 1.0:
        keep[1::3] = False
    crow = torch.zeros(n_br + 1, dtype=torch.int32)
    crow[1:] = keep.sum(1).cumsum(0)
    col = keep.nonzero()[:, 1].to(torch.int32)
    values = torch.randn(int(keep.sum()), bh, bw, generator=gen)
    rows = torch.repeat_interleave(torch.arange(n_br), keep.sum(1))
    pad_rows = (rows[:, None] * bh + torch.arange(bh)) >= n          # [nnz, bh]
    pad_cols = (col.long()[:, None] * bw + torch.arange(bw)) >= k     # [nnz, bw]
    values[pad_rows[:, :, None] | pad_cols[:, None, :]] = float("nan")
    return values.to(dtype), crow, col


def _cases():
    blocks = [(16, 16), (32, 32), (64, 64), (8, 8), (16, 32), (32, 16), (8, 24), (48, 16),
              (3, 5), (1, 1), (7, 9), (5, 16), (16, 3)]
    ms = [1, 2, 3, 4, 5, 17, 50]
    out = []
    for i, (bh, bw) in enumerate(blocks):
        for j, m in enumerate(ms):
            c = i * len(ms) + j
            k = 3 * bw + (bw // 2 + 1 if c % 2 else 0)  # every other case overhangs K
            n = 4 * bh + (5 if c % 3 == 0 else 0)      # every third overhangs N
            density = 1.0 if c % 7 == 0 else 0.0 if c % 11 == 0 else 0.45
            out.append(dict(m=m, k=k, n=n, bh=bh, bw=bw, density=density, bias=c % 2 == 0, strided=c % 5 == 0))
    out.append(dict(m=130, k=200, n=300, bh=32, bw=32, density=0.3, bias=True, strided=False))
    # ~5.5 MB of float32 weights: past the broadcast kernel's cache-resident size (its large-weight blocking).
    out.append(dict(m=75, k=1500, n=1530, bh=32, bw=32, density=0.9, bias=True, strided=True))
    # Past 8 token tiles with small weights (the outer product's tile-major order), and outputs past 4 MiB (staged
    # block rows written with streaming stores): blocks and column vectors.
    out.append(dict(m=500, k=200, n=300, bh=32, bw=32, density=0.5, bias=True, strided=True))
    out.append(dict(m=1100, k=96, n=1024, bh=16, bw=16, density=0.45, bias=True, strided=False))
    out.append(dict(m=1100, k=100, n=1024, bh=16, bw=1, density=0.3, bias=False, strided=True))
    return out


def _worker(which_only: bool) -> None:
    import torch

    import pysparse
    from conftest import concurrent_call_failures  # this file's folder is the script's first sys.path entry
    from pysparse.ops import ACTIVATIONS, bsr_linear, bsr_linear_reference, kernel_layout

    isa = pysparse.ops.available_backends()["cpu"]
    transposed_32 = pysparse.ops.cpu_reads_transposed(32, 32)
    if which_only or isa != os.environ.get("PYSPARSE_CPU_ISA"):
        print(json.dumps({"isa": isa, "reads_transposed_32x32": transposed_32, "checked": 0, "failures": []}))
        return
    gen = torch.Generator().manual_seed(0)
    failures, checked = [], 0
    tols = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

    def check(case, dtype, threads=None):
        nonlocal checked
        m, k, n = case["m"], case["k"], case["n"]
        values, crow, col = _random_bsr(torch, n, k, case["bh"], case["bw"], case["density"], dtype, gen)
        x = torch.randn(m, k + 3 if case["strided"] else k, generator=gen).to(dtype)
        if case["strided"]:
            x = x[:, 1:k + 1]  # rows further apart than K, unaligned start
        bias = torch.randn(n, generator=gen).to(dtype) if case["bias"] else None
        ref = bsr_linear_reference(x.double(), values.double(), crow, col,
                                   None if bias is None else bias.double(), n)
        # Row-major values, then (where it differs) the layout SparseLinear keeps for this path.
        laid_out = kernel_layout(values)
        for vals in (values, laid_out) if laid_out is not values else (values,):
            # The op allocates its output; freeing a NaN tensor of that size first makes the allocator likely to
            # hand the same memory back, so an output element the kernel forgot would show up as NaN.
            del_me = torch.full((m, n), float("nan"), dtype=dtype)
            del del_me
            y = bsr_linear(x, vals, crow, col, bias, n)
            err = (y.double() - ref).abs().max().item() if y.numel() else 0.0
            scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)
            checked += 1
            if not (torch.isfinite(y).all() and err / scale < tols[dtype]):
                failures.append(f"{isa} {dtype} {case} threads={threads} block-transposed={vals is laid_out}: "
                                f"rel err {err / scale:.3g}, finite={bool(torch.isfinite(y).all())}")

    cases = _cases()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # 16-bit types share the float32 kernels' tiling; every other case keeps the suite fast.
        for case in cases if dtype == torch.float32 else cases[dtype == torch.float16::2]:
            check(case, dtype)
    # Thread counts the op honours (torch.get_num_threads()), including more threads than work.
    for threads in (1, 3):
        torch.set_num_threads(threads)
        check(dict(m=40, k=96, n=130, bh=32, bw=32, density=0.5, bias=True, strided=False), torch.float32, threads)
        check(dict(m=1, k=96, n=130, bh=16, bw=16, density=0.5, bias=True, strided=False), torch.float32, threads)
    torch.set_num_threads(2)
    # Leading batch dims.
    values, crow, col = _random_bsr(torch, 70, 64, 16, 16, 0.5, torch.float32, gen)
    x = torch.randn(2, 3, 64, generator=gen)
    y = bsr_linear(x, values, crow, col, None, 70)
    ref = bsr_linear_reference(x.double(), values.double(), crow, col, None, 70)
    checked += 1
    if y.shape != (2, 3, 70) or (y.double() - ref).abs().max() / ref.abs().max() > 1e-5:
        failures.append(f"{isa} batched input: shape {tuple(y.shape)}")

    # The fused epilogue (residual, GELU) on streamed outputs.
    values, crow, col = _random_bsr(torch, 1024, 96, 32, 32, 0.4, torch.float32, gen)
    x, bias = torch.randn(1100, 96, generator=gen), torch.randn(1024, generator=gen)
    residual = torch.randn(1100, 1024, generator=gen)
    ref = ACTIVATIONS["gelu"](bsr_linear_reference(x.double(), values.double(), crow, col, bias.double(), 1024)
                              + residual.double())
    for vals in (values, kernel_layout(values)):
        y = bsr_linear(x, vals, crow, col, bias, 1024, activation="gelu", residual=residual)
        checked += 1
        if not (y.double() - ref).abs().max() / ref.abs().max() < 1e-5:
            failures.append(f"{isa} streamed outputs with residual and GELU disagree with the reference")

    # Concurrent callers: per-call buffers must not be shared between threads.
    values, crow, col = _random_bsr(torch, 256, 192, 32, 32, 0.5, torch.float32, gen)
    inputs = [torch.randn(m, 192, generator=gen) for m in (1, 3, 40, 77, 130, 2)]
    refs = [bsr_linear_reference(x.double(), values.double(), crow, col, None, 256) for x in inputs]
    errors = concurrent_call_failures(lambda x: bsr_linear(x, values, crow, col, None, 256), inputs, refs, 1e-5)
    checked += 1
    if errors:
        failures.append(f"{isa} concurrent callers disagreed with the reference: inputs {errors}")
    print(json.dumps({"isa": isa, "reads_transposed_32x32": transposed_32, "checked": checked, "failures": failures}))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker("--which" in sys.argv)
