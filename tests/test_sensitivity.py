"""Sensitivity analysis: per-layer drop and measured packed latency, and the budgeted per-layer suggestion."""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pysparse.analysis import pack_block_size, sensitivity
from pysparse.prune import get_masks, prune_

SPARSITIES = (0.25, 0.5)


def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(64, 64), act=nn.ReLU(), fc2=nn.Linear(64, 64), act2=nn.ReLU(),
                                     out=nn.Linear(64, 4)))


def zeros_metric(model):
    """A deterministic metric: minus the number of zero weights in fc1 and fc2, in thousands. Pruning a layer at
    sparsity s costs exactly s * 4.096; pruning both costs the sum."""
    return -sum(int((model.get_submodule(n).weight == 0).sum()) for n in ("fc1", "fc2")) / 1000


def run(budget, min_speedup=0.0, model=None):
    return sensitivity(model or net(), zeros_metric, torch.randn(8, 64), sparsities=SPARSITIES, budget=budget,
                       pattern="block", block_size=(16, 16), min_speedup=min_speedup, min_run_time=0.01)


def test_rows_measure_each_layer_alone():
    result = run(budget=math.inf)
    assert [(r.layer, r.sparsity) for r in result.rows] == [(n, s) for n in ("fc1", "fc2") for s in SPARSITIES]
    assert result.baseline == 0.0
    for r in result.rows:
        assert r.drop == pytest.approx(r.sparsity * 4.096)
        assert r.dense_s > 0 and r.sparse_s > 0 and r.speedup == r.dense_s / r.sparse_s
    assert result.suggestion == {"fc1": 0.5, "fc2": 0.5}
    assert result.suggested_metric == pytest.approx(-4.096)


def test_joint_budget_steps_back_the_worst_layer():
    # Alone, each layer fits at 0.5 (drop 2.048 <= 2.5); together they do not (4.096). Stepping back the layer
    # with the largest drop twice ends at 0.25 each (joint drop 2.048).
    result = run(budget=2.5)
    assert result.suggestion == {"fc1": 0.25, "fc2": 0.25}
    assert result.suggested_drop == pytest.approx(2.048) and result.suggested_drop <= 2.5
    table = result.table()
    assert "fc1" in table and "suggested fc1=0.25, fc2=0.25" in table


def test_layers_where_sparse_is_not_faster_stay_dense():
    result = run(budget=math.inf, min_speedup=math.inf)
    assert result.suggestion == {} and result.suggested_metric == result.baseline
    assert "left dense (no sparsity within budget is faster than dense): fc1, fc2" in result.table()


def test_zero_budget_suggests_nothing_that_costs():
    assert run(budget=0.0).suggestion == {}


def test_model_and_its_masks_are_left_untouched():
    model = net()
    masks = {n: m.clone() for n, m in prune_(model, sparsity=0.5, pattern="unstructured").items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(budget=math.inf, model=model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for n, m in get_masks(model).items():
        assert torch.equal(m, masks[n])


def test_loss_metric_lower_is_better():
    result = sensitivity(net(), lambda m: -zeros_metric(m), torch.randn(8, 64), sparsities=(0.5,), budget=2.1,
                         pattern="block", block_size=(16, 16), higher_is_better=False, min_speedup=0.0,
                         min_run_time=0.01)
    assert [r.drop for r in result.rows] == pytest.approx([2.048, 2.048])
    assert len(result.suggestion) == 1


def test_pack_block_size_per_pattern():
    assert pack_block_size("block", (16, 8), (64, 64)) == (16, 8)
    assert pack_block_size("channel", (16, 8), (6, 4, 3, 3)) == (1, 36)
    assert pack_block_size("nm", (16, 8), (64, 64)) == (1, 1)


def test_bad_input():
    with pytest.raises(ValueError, match=r"sparsities must be in \[0, 1\], got 1.5"):
        sensitivity(net(), zeros_metric, torch.randn(2, 64), sparsities=(1.5,))
    with pytest.raises(ValueError, match="no Linear layer to analyse"):
        sensitivity(net(), zeros_metric, torch.randn(2, 64), filter_fn=lambda n, m: False)
