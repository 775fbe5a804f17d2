"""Soak: 8 Python threads call the same and different sparse layers at once, with mixed batch sizes and dtypes, for a
bounded time; every result must equal what the layer computes alone (bitwise) and the dense reference (within the
dtype's tolerance)."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from torch import nn

from pysparse.nn import ChannelSparseLinear, SparseConv2d, SparseLinear, conv_weight_from_matrix

THREADS = 8
BATCHES = (1, 3, 8, 17)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _layers() -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(0)

    def blocks(n, k, bh, bw, density=0.4):
        keep = torch.rand(-(-n // bh), -(-k // bw), generator=g) < density
        return keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]

    torch.manual_seed(0)
    linear, conv, wide = nn.Linear(96, 80), nn.Conv2d(16, 24, 3, padding=1), nn.Linear(64, 48)
    layers = {"linear": SparseLinear.from_dense(linear, (16, 16), blocks(80, 96, 16, 16)),
              "linear_gelu": SparseLinear.from_dense(linear, (8, 8), blocks(80, 96, 8, 8), activation="gelu"),
              "conv": SparseConv2d.from_dense(conv, (8, 8), conv_weight_from_matrix(blocks(24, 144, 8, 8),
                                                                                    conv.weight.shape)),
              "channel": ChannelSparseLinear.from_dense(wide, out_index=torch.arange(0, 48, 3),
                                                        in_index=torch.arange(1, 64, 2))}
    out = {}
    for name, layer in layers.items():
        for dtype in TOLERANCE:
            out[f"{name}/{str(dtype)[6:]}"] = layer.to(dtype).eval()
    return out


def _dtype(layer: nn.Module) -> torch.dtype:
    return next(t for t in layer.state_dict().values() if t.is_floating_point()).dtype


def _input(name: str, layer: nn.Module, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    shape = (batch, layer.in_channels, 6, 7) if name.startswith("conv") else (batch, layer.in_features)
    return torch.randn(shape, generator=g).to(_dtype(layer))


def _dense(layer: nn.Module) -> nn.Module:
    return layer.to_conv2d() if isinstance(layer, SparseConv2d) else layer.to_linear()


def _soak(seconds: float) -> None:
    layers = _layers()
    cases = []
    with torch.inference_mode():
        for name, layer in layers.items():
            dtype = _dtype(layer)
            for batch in BATCHES:
                x = _input(name, layer, batch)
                alone = layer(x)
                want = _dense(layer).float()(x.float())
                err = ((alone.float() - want).abs().max() / want.abs().max()).item()
                assert err < TOLERANCE[dtype], f"{name} batch {batch}: rel. err {err:.2e} against the dense layer"
                cases.append((name, x, alone))
    failures: list[str] = []
    calls = [0] * THREADS
    stop = time.monotonic() + seconds
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        rng = random.Random(t)
        # half the threads hammer one shared layer, half pick any layer: same-layer and cross-layer concurrency
        mine = [c for c in cases if c[0] == "linear/float32"] if t % 2 else cases
        start.wait()
        with torch.inference_mode():
            while time.monotonic() < stop and not failures:
                name, x, alone = rng.choice(mine)
                got = layers[name](x)
                if got.shape != alone.shape or not torch.equal(got, alone):
                    failures.append(f"thread {t}: {name} batch {x.shape[0]} differs from the same call alone")
                calls[t] += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures[:5]
    assert all(n > 0 for n in calls), calls


def test_soak_short():
    _soak(5.0)


@pytest.mark.slow
def test_soak_60_seconds():
    _soak(60.0)
