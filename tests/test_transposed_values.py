"""The broadcast kernel (float32, bh a multiple of 8, on the AVX2 path; M >= 64, or any M with bh a multiple of 16)
reads each weight block transposed.
The CPU ops build that copy once per values tensor and keep it while the tensor lives and is unchanged
(csrc/cpu/transposed_values.cpp). These tests change the weight every way a user can (in place, through a view, new
storage, optimizer steps, inference tensors) and check each next call against the dense reference: a stale copy
would give the old weight's result."""
import gc
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse import _C, ops
from pysparse.formats import BlockSparseWeight
from pysparse.nn import SparseConv2d, SparseLinear

# Where the kernel reads the transposed copy: the cache fills. Elsewhere (AVX-512, generic) it must stay unused.
BROADCAST_PATH = ops.available_backends()["cpu"] == "avx2"
M = 96  # tokens: above the broadcast kernel's threshold for a per-call transpose (64)


def _cache_bytes() -> int:
    return _C.transposed_cache_bytes()


def _linear(n=200, k=150, block=(32, 16), seed=0, trainable=False) -> tuple[SparseLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(k, n)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n, k, generator=gen))
    bh, bw = block
    keep = torch.rand(-(-n // bh), -(-k // bw), generator=gen) < 0.4
    mask = keep.repeat_interleave(bh, 0)[:n].repeat_interleave(bw, 1)[:, :k]
    return SparseLinear.from_dense(dense, block, mask=mask, trainable=trainable), torch.randn(M, k, generator=gen)


def _expected(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), layer.weight.to_dense().double(), layer.bias.double()).float()


def _check(layer: SparseLinear, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        for rows in (x, x[:1], x[:7]):  # the large-M kernel; small M reads the same copy where bh allows
            torch.testing.assert_close(layer(rows), _expected(layer, rows), rtol=1e-5, atol=1e-4, msg=what)


def test_copy_is_built_once_and_reused():
    layer, x = _linear()
    before = _cache_bytes()
    _check(layer, x, "first call")
    after = _cache_bytes()
    if BROADCAST_PATH:
        # The copy is held (a miss also drops the copies of earlier tests' dead weights: hence >=, not ==).
        assert after >= layer.values.numel() * 4
    else:
        assert after == before  # nothing reads a copy: none is made
    _check(layer, x, "second call")
    assert _cache_bytes() == after  # the same copy, not a second one
    _check(layer, x[:3], "three tokens")  # small M reads the copy too (bh a multiple of 16), or the blocks as stored
    assert _cache_bytes() == after


def test_in_place_changes_are_seen():
    layer, x = _linear(seed=1)
    _check(layer, x, "before")
    with torch.no_grad():
        layer.values.mul_(-2.0)
    _check(layer, x, "after mul_")
    with torch.no_grad():
        layer.values[1].zero_()  # through a view: views share the version counter
    _check(layer, x, "after zeroing a block through a view")
    with torch.no_grad():
        layer.values.copy_(torch.randn_like(layer.values))
    _check(layer, x, "after copy_")


def test_new_storage_is_seen():
    layer, x = _linear(seed=2)
    _check(layer, x, "before")
    layer.values.data = torch.randn_like(layer.values)  # same tensor object, other storage
    _check(layer, x, "after .data =")
    other, _ = _linear(seed=3)
    layer.load_state_dict(other.state_dict())  # another pattern: new buffers
    _check(layer, x, "after load_state_dict")


def test_optimizer_steps_are_seen():
    layer, x = _linear(seed=4, trainable=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(3):
        layer.train()
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.eval()
        _check(layer, x, f"eval after step {step}")


def test_copies_of_dead_weights_are_released():
    base = _cache_bytes()
    layer, x = _linear(seed=5)
    _check(layer, x, "first weight")
    del layer
    gc.collect()
    second, x = _linear(n=64, k=64, seed=6)
    _check(second, x, "second weight")
    # The next copy built (a miss) drops every copy whose weight no longer exists.
    assert _cache_bytes() - base <= (second.values.numel() * 4 if BROADCAST_PATH else 0)


def test_inference_tensors_are_never_cached_and_stay_right():
    before = _cache_bytes()
    with torch.inference_mode():
        layer, x = _linear(seed=7)
        _check(layer, x, "inference tensor")
        layer.values.mul_(3.0)  # no version counter: only not caching keeps this right
        _check(layer, x, "inference tensor changed in place")
    assert _cache_bytes() == before


def test_non_contiguous_values_are_not_cached():
    layer, x = _linear(seed=8)
    values = layer.values.transpose(1, 2).contiguous().transpose(1, 2)  # same numbers, other strides
    before = _cache_bytes()
    y = ops.bsr_linear(x, values, layer.crow_indices, layer.col_indices, layer.bias, layer.out_features)
    torch.testing.assert_close(y, _expected(layer, x), rtol=1e-5, atol=1e-4)
    assert _cache_bytes() == before  # the op's contiguous copy dies with the call


def test_implicit_conv_sees_in_place_changes():
    gen = torch.Generator().manual_seed(9)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    sparse = SparseConv2d.from_dense(conv, (8, 16)).eval()
    x = torch.randn(2, 16, 9, 7, generator=gen)
    for what in ("before", "after mul_"):
        with torch.no_grad():
            dense_w = sparse.weight.to_dense().reshape(24, 3, 3, 16).permute(0, 3, 1, 2)
            torch.testing.assert_close(sparse(x), F.conv2d(x, dense_w, sparse.bias, padding=1), rtol=1e-4,
                                       atol=1e-4, msg=what)
            sparse.linear.values.mul_(-0.5)


def test_concurrent_callers():
    layers = [_linear(seed=10 + i) for i in range(3)]
    errors = []

    def work(i):
        try:
            for rep in range(4):
                layer, x = layers[(i + rep) % len(layers)]  # the same layers from several threads at once
                _check(layer, x, f"thread {i} rep {rep}")
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("limit_mb, cached", [("0", False), ("1", False), ("8", True)])
def test_cache_limit(limit_mb, cached):
    # The weight's values are 2 MB: off (0) and too small a cap (1 MB) transpose per call; 8 MB holds it.
    code = (
        "import torch, torch.nn.functional as F; from pysparse import _C, ops\n"
        "from pysparse.formats import BlockSparseWeight\n"
        "w = torch.randn(1024, 512); b = BlockSparseWeight.from_dense(w, (32, 32)); x = torch.randn(128, 512)\n"
        "for _ in range(2):\n"
        "    y = ops.bsr_linear(x, b.values, b.crow_indices, b.col_indices, None, 1024)\n"
        "    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-3)\n"
        "print('cached', _C.transposed_cache_bytes() == b.values.numel() * 4)\n"
    )
    env = dict(os.environ, PYSPARSE_CPU_TRANSPOSED_CACHE_MB=limit_mb)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"cached {cached and BROADCAST_PATH}"
