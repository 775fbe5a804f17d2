"""fold_batchnorm(): which Conv/Linear -> BatchNorm pairs fold, why the others stay, and that outputs are unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from conftest import generator_for
from pysparse import fold_batchnorm, sparsify
from pysparse.bench.sweep import block_mask
from pysparse.transforms.fold_batchnorm import FoldReport
from pysparse.nn import SparseConv2d, conv_weight_from_matrix, conv_weight_matrix
from pysparse.prune import prune_


def _random_bn_(model: nn.Module, name: str) -> nn.Module:
    """Random running statistics and affine parameters, so no BatchNorm is close to the identity."""
    g = generator_for(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_resnet18_folds_every_batchnorm():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _random_bn_(torchvision.models.resnet18(weights=None).eval(), "resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert type(folded) is type(model) and folded is not model
    assert _count_bn(model) == 20 and _count_bn(folded) == 0
    assert isinstance(folded.layer1[0].bn1, nn.Identity) and isinstance(folded.layer2[0].downsample[1], nn.Identity)
    assert folded.conv1.bias is not None and model.conv1.bias is None   # bias created where there was none
    x = torch.randn(2, 3, 64, 64, generator=generator_for("resnet18-x"))
    bare = copy.deepcopy(model)   # the BatchNorms dropped, not folded: far off, so the fold is not trivial
    for parent in list(bare.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, nn.Identity())
    with torch.no_grad():
        ref, out = model(x), folded(x)
        assert _rel(bare(x), ref) > 0.1
    assert _rel(out, ref) < 1e-5, _rel(out, ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # not inplace: untouched

    report = folded.fold_report
    assert isinstance(report, FoldReport) and len(report) == 20 and not report.skipped and report.error is None
    assert ("conv1", "bn1") in report.folded and ("layer3.0.downsample.0", "layer3.0.downsample.1") in report.folded
    assert report["layer4.1.bn2"].layer == "layer4.1.conv2"
    assert "20/20 BatchNorm layers folded" in str(report)
    same = fold_batchnorm(model, inplace=True)
    assert same is model and _count_bn(model) == 0
    with torch.no_grad():
        assert _rel(model(x), ref) < 1e-5


class Mixed(nn.Module):
    """One foldable Conv2d and Linear pair, and a case of each reason a BatchNorm stays."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)                      # folds
        self.shared_conv = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)               # its conv's output also feeds the residual add
        self.twice = nn.BatchNorm2d(8)                   # called twice
        self.batch_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.after_relu = nn.BatchNorm2d(8)              # its input is a ReLU
        self.fc = nn.Linear(8, 6, bias=False)
        self.bn1d = nn.BatchNorm1d(6)                    # folds (2-D input)
        self.unused = nn.BatchNorm1d(4)                  # never called

    def forward(self, x):
        x = self.bn(self.conv(x))
        y = self.shared_conv(x)
        x = self.shared_bn(y) + y
        x = self.twice(self.twice(x))
        x = self.after_relu(torch.relu(self.batch_stats(x)))
        return self.bn1d(self.fc(x.mean((2, 3))))


def test_skips_with_reasons_and_keeps_outputs():
    model = _random_bn_(Mixed().eval(), "mixed")
    folded = fold_batchnorm(model)
    report = folded.fold_report
    assert sorted(report.folded) == [("conv", "bn"), ("fc", "bn1d")]
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.bn1d, nn.Identity)
    assert folded.fc.bias is not None and folded.fc.bias.requires_grad
    reasons = {e.bn: e.reason for e in report.skipped}
    assert set(reasons) == {"shared_bn", "twice", "batch_stats", "after_relu", "unused"}
    assert "output of 'shared_conv' also feeds" in reasons["shared_bn"]
    assert report["shared_bn"].layer == "shared_conv"
    assert "called 2 times" in reasons["twice"]
    assert "track_running_stats=False" in reasons["batch_stats"]
    assert "relu" in reasons["after_relu"] and report["after_relu"].layer is None
    assert "not called" in reasons["unused"]
    for name in reasons:
        assert isinstance(getattr(folded, name), nn.modules.batchnorm._BatchNorm)
    assert torch.equal(folded.shared_conv.weight, model.shared_conv.weight)
    x = torch.randn(4, 3, 10, 10, generator=generator_for("mixed-x"))
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5


def test_refuses_training_mode():
    model = _random_bn_(Mixed(), "train")
    with pytest.raises(ValueError, match="eval mode.*training=True"):
        fold_batchnorm(model)
    model.eval()
    model.bn.train()
    with pytest.raises(ValueError, match=r"training=True for \['bn'\]"):
        fold_batchnorm(model, inplace=True)
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bias is not None   # nothing changed before refusing
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fold_batchnorm("model")


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if x.sum() > 0 else -x


def test_untraceable_model_is_left_alone():
    model = _random_bn_(Branchy().eval(), "branchy")
    folded = fold_batchnorm(model)
    report = folded.fold_report
    assert report.folded == [] and "torch.fx could not trace" in report.error
    assert [(e.bn, e.folded) for e in report] == [("bn", False)]
    assert isinstance(folded.bn, nn.BatchNorm2d) and torch.equal(folded.conv.weight, model.conv.weight)
    assert "nothing folded" in str(report)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.features(x))


def _zero_blocks_(conv: nn.Conv2d, density: float, g: torch.Generator) -> None:
    # Exactly round(density * blocks) kept, so every seed leaves the layer sparse enough for sparsify's default.
    mat = conv_weight_matrix(conv.weight)
    mask = block_mask(*mat.shape, (16, 16), 1 - density, g)
    with torch.no_grad():
        conv.weight.mul_(conv_weight_from_matrix(mask, conv.weight.shape))


@pytest.mark.parametrize("masks", ["zeroed", "held"])
def test_sparsify_with_fold_equals_masked_dense(masks):
    torch.manual_seed(0)
    model = _random_bn_(SmallCNN(), f"cnn-{masks}")
    convs = [model.features[3], model.features[6]]
    if masks == "held":   # prune_ keeps the masks as parametrizations: the fold scales the unmasked original
        prune_(model, sparsity=0.6, pattern="block", block_size=(16, 16), filter_fn=lambda n, m: m in convs)
    else:
        g = generator_for("cnn-zero")
        for conv in convs:
            _zero_blocks_(conv, 0.4, g)
    model.eval()
    plain = sparsify(model, block_size=(16, 16))
    out = sparsify(model, block_size=(16, 16), fold_batchnorm=True)
    assert _count_bn(out) == 0 and len(out.fold_report.folded) == 3
    assert [r.name for r in out.sparsify_report.swapped] == ["features.3", "features.6"]
    for name in ("features.3", "features.6"):   # the fold keeps the block pattern
        assert out.sparsify_report[name].density == plain.sparsify_report[name].density
        assert isinstance(out.get_submodule(name), SparseConv2d)
    assert _count_bn(model) == 3 and parametrize.is_parametrized(convs[0]) == (masks == "held")
    x = torch.randn(3, 3, 12, 12, generator=generator_for(f"cnn-x-{masks}"))
    with torch.no_grad():
        assert _rel(out(x), model(x)) < 1e-5, _rel(out(x), model(x))

    with pytest.raises(ValueError, match="trainable"):
        sparsify(model, fold_batchnorm=True, trainable=True)
    with pytest.raises(ValueError, match="eval mode"):
        sparsify(model.train(), fold_batchnorm=True)


def test_after_sparsify_points_to_the_dense_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32)).eval()
    _zero_blocks_(model[0], 0.3, generator_for("late"))
    late = fold_batchnorm(sparsify(model, block_size=(16, 16)))
    assert late.fold_report.folded == [] and "before sparsify" in late.fold_report["1"].reason
