"""The CPU ops' output buffers (>= 1 MB) are recycled: a dead output's memory serves the next output of the same
size, so large layers stop paying page faults on fresh memory (csrc/cpu/output_pool.cpp). The tensors must behave
like any other (writable, resizable), and PYSPARSE_CPU_OUTPUT_CACHE_MB=0 turns the pool off."""
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from pysparse import ops
from pysparse.formats import BlockSparseWeight


def _layer(n=512, k=64, m=1024):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    mask = (torch.rand(n // 32, k // 32, generator=gen) < 0.5).repeat_interleave(32, 0).repeat_interleave(32, 1)
    return BlockSparseWeight.from_dense(w, (32, 32), mask=mask), torch.randn(m, k, generator=gen), w * mask


def _call(bsw, x):
    return ops.bsr_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, None, bsw.shape[0])


def test_dead_output_memory_serves_the_next_call_and_results_stay_right():
    bsw, x, dense = _layer()  # output 1024 x 512 floats = 2 MB: pooled
    y = _call(bsw, x)
    ptr = y.data_ptr()
    torch.testing.assert_close(y, F.linear(x, dense), rtol=1e-5, atol=1e-5)
    y.fill_(float("nan"))  # the next call must overwrite every element of the recycled buffer
    del y
    y2 = _call(bsw, x)
    assert y2.data_ptr() == ptr
    torch.testing.assert_close(y2, F.linear(x, dense), rtol=1e-5, atol=1e-5)
    live = _call(bsw, x)  # y2 still alive: a different buffer
    assert live.data_ptr() != y2.data_ptr()


def test_small_outputs_and_resizing_behave_like_plain_tensors():
    bsw, x, dense = _layer(m=8)  # 8 x 512 floats: below the pooling size
    torch.testing.assert_close(_call(bsw, x), F.linear(x, dense), rtol=1e-5, atol=1e-5)
    bsw, x, dense = _layer()
    y = _call(bsw, x)
    y.resize_(4096, 512)  # the storage grows through the pool's allocator
    y.fill_(1.0)
    assert y.sum().item() == 4096 * 512


def test_ops_run_with_the_pool_off():
    code = (
        "import torch; from pysparse import ops; from pysparse.formats import BlockSparseWeight\n"
        "w = torch.randn(512, 64); b = BlockSparseWeight.from_dense(w, (32, 32)); x = torch.randn(1024, 64)\n"
        "f = lambda: ops.bsr_linear(x, b.values, b.crow_indices, b.col_indices, None, 512)\n"
        "y = f(); torch.testing.assert_close(y, torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYSPARSE_CPU_OUTPUT_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _child_uses_the_pool(bsw, x, dense):
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork(), with or without pysparse
    y = _call(bsw, x)  # served from a buffer the parent freed before forking
    torch.testing.assert_close(y, F.linear(x, dense), rtol=1e-5, atol=1e-5)


def test_forked_child_inherits_a_usable_pool():
    import multiprocessing

    bsw, x, dense = _layer()
    _call(bsw, x)  # an output dies in the parent: its buffer is in the pool when the child is forked
    child = multiprocessing.get_context("fork").Process(target=_child_uses_the_pool, args=(bsw, x, dense))
    child.start()
    child.join(60)
    assert child.exitcode == 0
