"""pysparse.ops.force_cpu_path: switching the CPU kernel path inside one process (the test and benchmark hook)."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from pysparse import ops
from pysparse.nn import SparseConv2d, SparseLinear


def _pruned_linear(k: int, n: int, keep: float, seed: int) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        lin.weight.mul_(torch.rand(n, k, generator=gen) < keep)
    return lin


@pytest.mark.parametrize("block_size", [(32, 32), (16, 1), (4, 4), (1, 1)])
def test_every_path_matches_the_reference_on_layers_packed_under_any_path(block_size):
    lin = _pruned_linear(200, 150, 0.3, seed=1)
    default_layer = SparseLinear.from_dense(lin, block_size=block_size)
    for isa in ops.cpu_paths():
        for broadcast in (None, True, False):
            with ops.force_cpu_path(isa, broadcast=broadcast) as path:
                assert path[0] == isa
                own_layer = SparseLinear.from_dense(lin, block_size=block_size)
                for m in (1, 3, 17, 64):
                    x = torch.randn(m, 200)
                    want = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()).float()
                    for layer in (own_layer, default_layer):
                        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4,
                                                   msg=f"{isa} broadcast={broadcast} m={m}")


def test_the_previous_path_comes_back_after_nested_blocks_and_errors():
    start = ops.current_cpu_path()
    with ops.force_cpu_path("generic"):
        assert ops.current_cpu_path() == ("generic", False)
        if "avx2" in ops.cpu_paths():
            with ops.force_cpu_path("avx2", broadcast=False):
                assert ops.current_cpu_path() == ("avx2", False)
            assert ops.current_cpu_path() == ("generic", False)
        with pytest.raises(RuntimeError, match="inside"):
            with ops.force_cpu_path(None):
                raise RuntimeError("inside")
        assert ops.current_cpu_path() == ("generic", False)
    assert ops.current_cpu_path() == start


def test_the_layout_follows_the_forced_path():
    paths = ops.cpu_paths()
    if "avx2" not in paths:
        pytest.skip("no SIMD path on this CPU")
    with ops.force_cpu_path("avx2", broadcast=True):
        assert ops.cpu_reads_transposed(32, 32)
    with ops.force_cpu_path("avx2", broadcast=False):
        assert not ops.cpu_reads_transposed(32, 32)
    with ops.force_cpu_path("generic"):
        assert not ops.cpu_reads_transposed(32, 32)


def test_sparse_conv_falls_back_to_im2col_on_the_generic_path():
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=gen) < 0.4)
    x = torch.randn(2, 16, 9, 7, generator=gen)
    want = conv(x)
    for isa in ops.cpu_paths():
        with ops.force_cpu_path(isa):
            assert ops.implicit_conv2d_available() == (isa != "generic")
            layer = SparseConv2d.from_dense(conv, block_size=(8, 8))
            torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


def test_switching_while_other_threads_compute_never_gives_a_wrong_result():
    lin = _pruned_linear(256, 192, 0.2, seed=3)
    layer = SparseLinear.from_dense(lin, block_size=(32, 32))
    x = torch.randn(8, 256)
    want = lin(x)
    errors, stop = [], threading.Event()

    def compute():
        while not stop.is_set():
            err = (layer(x) - want).abs().max().item()
            if err > 1e-4:
                errors.append(err)

    threads = [threading.Thread(target=compute) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            for isa in ops.cpu_paths():
                with ops.force_cpu_path(isa, broadcast=bool(_ % 2)):
                    pass
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors


def test_bad_requests_name_the_argument():
    with pytest.raises(ValueError, match="isa must be one of"):
        with ops.force_cpu_path("avx1024"):
            pass
    with pytest.raises(TypeError, match="isa must be a path name"):
        with ops.force_cpu_path(2):
            pass
    with pytest.raises(TypeError, match="broadcast must be a bool"):
        with ops.force_cpu_path(None, broadcast=1):
            pass
    missing = [name for name in ops.CPU_PATHS if name not in ops.cpu_paths()]
    if missing:
        with pytest.raises(ValueError, match="not a path this CPU runs"):
            with ops.force_cpu_path(missing[0]):
                pass


def test_the_path_choice_benchmark_times_every_variant_on_a_small_point():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_path_choice.py"
    spec = importlib.util.spec_from_file_location("bench_path_choice", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    start = ops.current_cpu_path()
    rows = bench.run_point(70, 40, "16x16", 0.6, [1, 5], rounds=1, min_time=0.001)
    assert ops.current_cpu_path() == start
    assert [r["m"] for r in rows] == [1, 5]
    for row in rows:
        assert set(row["forced_s"]) == {bench._label(*v) for v in bench.variants()}
        assert row["best"] in row["forced_s"] and row["default_over_best"] > 0
