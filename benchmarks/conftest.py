"""Shared setup of the pytest-benchmark suites in benchmarks/ (``bench_*.py``).

    python -m pytest benchmarks/ --benchmark-only [--bench-threads 2] [--benchmark-json out.json]

* collects every ``benchmarks/bench_*.py`` (pytest's default pattern is ``test_*.py``; scripts there that define
  no ``test_*`` functions contribute nothing);
* ``--bench-threads`` (default 2, the machine kind's cores) sets torch's threads for the whole session;
* the benchmark JSON's ``machine_info`` gets pysparse's environment (CPU model, ISA path, threads, load average,
  GPU and CUDA), the same record ``python -m pysparse bench`` keeps;
* ``vs_dense`` times a variant with ``benchmark.pedantic`` and stores its ratio to the group's dense variant
  (timed earlier in the same session) in ``extra_info["ratio_vs_dense"]``.

Helpers for scripts live in the package: ``pysparse.bench.sweep.block_mask`` (exact-density random block masks),
``pysparse.bench.check.rel_err``, ``pysparse.bench.timing`` (CPU median, CUDA events).
"""
from __future__ import annotations

import pytest
import torch

from pysparse import ops
from pysparse.bench import environment


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=2,
                     help="torch threads for the benchmarks in benchmarks/ (default 2)")


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself: collecting them here too would run them twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    threads = config.getoption("--bench-threads")
    if threads < 1:
        raise pytest.UsageError(f"--bench-threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["pysparse"] = environment.collect("cuda" if ops.available_backends()["cuda"] else "cpu")


@pytest.fixture(scope="session")
def _dense_medians() -> dict:
    return {}


@pytest.fixture
def vs_dense(benchmark, _dense_medians):
    """``vs_dense(group, variant, fn, rounds=..., target=...)``: time ``fn`` (no grad, one warm-up round) as
    ``variant`` of ``group``; the variant named "dense" is the baseline the others' ratios refer to."""

    def record(group: str, variant: str, fn, *, rounds: int, target: str | None = None) -> float:
        benchmark.group = group
        with torch.no_grad():
            benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        median = benchmark.stats.stats.median
        _dense_medians.setdefault(group, {})[variant] = median
        benchmark.extra_info.update(threads=torch.get_num_threads(), variant=variant)
        if target is not None:
            benchmark.extra_info["target"] = target
        dense = _dense_medians[group].get("dense")
        if variant != "dense" and dense is not None:
            benchmark.extra_info["ratio_vs_dense"] = dense / median
        return median

    return record
