"""prune_channels' criteria: a fixed ratio or a threshold gamma, on weight magnitude or on BatchNorm scales
(network slimming). Models are built so the channels that must go are known: exactly those go."""
import copy

import pytest
import torch
from torch import nn

from pysparse.prune import channel_surgery_record, prune_channels


class ConvBN(nn.Module):
    """conv-BN-ReLU twice, then global pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


SMALL_1, SMALL_2 = [1, 4, 9], [0, 15]  # channels whose BatchNorm gamma is (nearly) zero


def slimmable(seed=0) -> ConvBN:
    torch.manual_seed(seed)
    model = ConvBN()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.weight.uniform_(0.5, 1.5)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        model.b1.weight[SMALL_1] = 1e-4
        model.b2.weight[SMALL_2] = -1e-5  # |gamma| is what counts
    return model


def kept(model, name) -> list[int]:
    return channel_surgery_record(model)["steps"][0]["params"][name]["keep"]["0"]


def removed_from_16(model, name) -> list[int]:
    return sorted(set(range(16)) - set(kept(model, name)))


def test_bn_threshold_removes_exactly_the_small_gammas():
    model, x = slimmable(), torch.randn(2, 3, 8, 8)
    dense = copy.deepcopy(model).eval()
    pruned, report = prune_channels(model, x, threshold=1e-3, importance="bn", round_to=1, return_report=True)
    assert removed_from_16(pruned, "c1.weight") == SMALL_1 and removed_from_16(pruned, "c2.weight") == SMALL_2
    assert report.removed() == {"c1": 3, "c2": 2, "fc": 0}
    assert "below 0.001" in report.criterion and "BatchNorm" in report.criterion
    assert "lost" in str(report)
    # a channel whose gamma is ~0 (and beta 0) outputs ~0 after its BatchNorm: removing it changes next to nothing
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), dense(x), atol=1e-3, rtol=0)


def test_bn_ratio_ranks_by_gamma():
    pruned = prune_channels(slimmable(1), torch.randn(1, 3, 8, 8), ratio=3 / 16, importance="bn", round_to=1)
    assert removed_from_16(pruned, "c1.weight") == SMALL_1
    assert len(removed_from_16(pruned, "c2.weight")) == 3 and set(SMALL_2) < set(removed_from_16(pruned, "c2.weight"))


def test_bn_keeps_channels_no_batchnorm_scales_and_says_so():
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruned, report = prune_channels(mlp, torch.randn(2, 8), threshold=10.0, importance="bn", return_report=True)
    assert pruned[0].out_features == 16 and report.params_after == report.params_before
    assert "no BatchNorm" in report.unpruned()["0"]
    assert any("no BatchNorm scales" in n for n in report.notes)


def test_magnitude_threshold_removes_the_channels_below_it():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    small = [2, 5, 11]
    with torch.no_grad():
        mlp[0].weight[small] *= 1e-3   # a channel's importance: its row in layer 0 plus its column in layer 2
        mlp[2].weight[:, small] *= 1e-3
    pruned, report = prune_channels(mlp, torch.randn(2, 8), threshold=0.05, round_to=1, return_report=True)
    assert removed_from_16(pruned, "0.weight") == small and report.removed()["0"] == 3


def test_threshold_rounds_towards_keeping():
    """16 channels, 3 below the threshold, round_to=8: removing 8 would take channels above it, so none go."""
    model = slimmable()
    pruned, report = prune_channels(model, torch.randn(1, 3, 8, 8), threshold=1e-3, importance="bn", round_to=8,
                                    return_report=True)
    assert report.removed() == {"c1": 0, "c2": 0, "fc": 0} and channel_surgery_record(pruned) is None


def test_threshold_zero_removes_nothing():
    _, report = prune_channels(slimmable(), torch.randn(1, 3, 8, 8), threshold=0, round_to=1, return_report=True)
    assert report.params_after == report.params_before


def test_default_ratio_is_half():
    x = torch.randn(1, 3, 8, 8)
    by_default = prune_channels(slimmable(), x, round_to=1)
    explicit = prune_channels(slimmable(), x, ratio=0.5, round_to=1)
    assert channel_surgery_record(by_default) == channel_surgery_record(explicit)
    assert by_default.c1.out_channels == 8


@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": -0.1}, "threshold must be a finite number >= 0, got -0.1"),
    ({"threshold": float("nan")}, "threshold must be a finite number"),
    ({"threshold": True}, "threshold must be"),
    ({"threshold": "0.1"}, "threshold must be"),
    ({"ratio": 0.3, "threshold": 0.1}, "either ratio or threshold, not both"),
    ({"ratio": 0.5, "threshold": 0.1}, "either ratio or threshold, not both"),
    ({"importance": "taylor"}, "importance must be one of"),
])
def test_bad_criteria_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_channels(slimmable(), torch.randn(1, 3, 8, 8), **kwargs)
