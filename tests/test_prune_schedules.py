"""GradualSchedule (cubic, Zhu & Gupta) and the fine_tune loop that applies it."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse.prune import GradualSchedule, fine_tune, get_masks, mask_sparsity, prune_


def test_cubic_values_and_steps():
    s = GradualSchedule(initial=0.1, final=0.9, start_step=100, end_step=500, every=100)
    assert s.steps == [100, 200, 300, 400, 500]
    assert [s.is_pruning_step(t) for t in (99, 100, 150, 200, 500, 600)] == [False, True, False, True, True, False]
    assert s(0) == 0.1 and s(100) == pytest.approx(0.1) and s(500) == 0.9 and s(10**6) == 0.9
    for t in (200, 300, 400):
        assert s(t) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (t - 100) / 400) ** 3)
    assert s(250) == s(200)                                   # holds between pruning steps
    values = [s(t) for t in range(0, 700, 10)]
    assert values == sorted(values)
    increments = [s(t + 100) - s(t) for t in (100, 200, 300, 400)]
    assert increments == sorted(increments, reverse=True)     # fast early, slow late


def test_end_step_not_a_multiple_of_every_is_still_a_pruning_step():
    s = GradualSchedule(0.0, 0.5, start_step=0, end_step=250, every=100)
    assert s.steps == [0, 100, 200, 250] and s(249) == s(200) < s(250) == 0.5


def test_one_shot_schedule():
    s = GradualSchedule(0.0, 0.8, start_step=5, end_step=5, every=1)
    assert s.steps == [5] and s(4) == 0.0 and s(5) == 0.8


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"initial": 0.5, "final": 0.2}, ValueError, r"initial must be <= final"),
    ({"final": 1.5}, ValueError, r"final must be in \[0, 1\], got 1.5"),
    ({"start_step": 10, "end_step": 5}, ValueError, r"start_step <= end_step"),
    ({"every": 0}, ValueError, r"every must be >= 1, got 0"),
    ({"every": 2.5}, TypeError, r"every must be an int, got float"),
])
def test_schedule_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GradualSchedule(**kwargs)


def make_data(n_batches=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 16, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(32, 16, generator=g)
        out.append((x, (x @ w.T).argmax(1)))
    return out


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act=nn.ReLU(), fc2=nn.Linear(32, 32), act2=nn.ReLU(),
                                     out=nn.Linear(32, 3)))


def test_fine_tune_with_gradual_schedule_reaches_final_sparsity_monotonically():
    model = small_net()
    schedule = GradualSchedule(0.0, 0.75, start_step=0, end_step=12, every=4)
    history = fine_tune(model, make_data(), F.cross_entropy, torch.optim.Adam(model.parameters(), lr=1e-2),
                        steps=20, schedule=schedule, progress=False, pattern="unstructured")
    assert [h["step"] for h in history] == list(range(20))          # 20 steps over several epochs of 6 batches
    sparsities = [h["sparsity"] for h in history]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.75)
    for t in range(20):   # each layer prunes round(s * entries): within one entry of the smaller layer (16x32)
        assert sparsities[t] == pytest.approx(schedule(t), abs=1 / 512)
    assert len(set(sparsities)) == len(schedule.steps)
    assert mask_sparsity(model) == pytest.approx(0.75)
    for name, mask in get_masks(model).items():
        assert bool((model.get_submodule(name).weight[~mask] == 0).all())
    assert history[-1]["loss"] < history[0]["loss"]


def test_fine_tune_one_shot_keeps_existing_masks():
    model = small_net()
    masks = {n: m.clone() for n, m in prune_(model, sparsity=0.5, pattern="unstructured").items()}
    fine_tune(model, make_data(), F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
              steps=10, progress=False)
    for n, m in get_masks(model).items():
        assert torch.equal(m, masks[n])
        assert bool((model.get_submodule(n).weight[~m] == 0).all())


def test_fine_tune_steps_lr_scheduler_and_shows_progress(capsys):
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    fine_tune(model, make_data(), F.cross_entropy, optimizer, steps=3, lr_scheduler=scheduler, progress=True,
              desc="tuning")
    assert optimizer.param_groups[0]["lr"] == 0.125
    assert "tuning" in capsys.readouterr().err


def test_fine_tune_bad_input():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="data yielded no batches"):
        fine_tune(model, iter([]), F.cross_entropy, opt, steps=2, progress=False)
    with pytest.raises(TypeError, match=r"pruning arguments \['pattern'\] need a schedule"):
        fine_tune(model, make_data(), F.cross_entropy, opt, steps=2, progress=False, pattern="block")
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        fine_tune(model, make_data(), F.cross_entropy, opt, steps=-1, progress=False)
