"""The shared timer: one median per variant, measured in alternating rounds."""
import math

from pysparse.analysis.timing import alternating_medians, median_seconds


def test_alternating_medians_times_every_variant_each_round():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            return sum(range(200))
        return fn

    out = alternating_medians({"a": make("a"), "b": make("b")}, rounds=3, min_run_time=0.001)
    assert set(out) == {"a", "b"}
    assert all(math.isfinite(v) and v > 0 for v in out.values())
    assert calls["a"] >= 3 * 2 and calls["b"] >= 3 * 2  # warm-up + at least one timed call per round


def test_median_seconds_orders_cheap_and_expensive_work():
    cheap = median_seconds(lambda: sum(range(10)), min_run_time=0.01)
    costly = median_seconds(lambda: sum(range(200_000)), min_run_time=0.01)
    assert cheap < costly
