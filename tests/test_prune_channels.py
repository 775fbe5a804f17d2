"""Structural channel pruning: the pruned model runs, keeps its output shape, and computes exactly what the dense
model computes with the removed channels' weight slices zeroed (for models whose ops do not mix channels:
BatchNorm, ReLU-family activations, adds, muls, concat, convs, linears).

Why that equality is a strong check: zeroing every removed slice (producer rows, BatchNorm entries, consumer
columns) makes the removed channels identically zero in the dense model and invisible to every consumer; if the
surgery removed a consumer column that does not belong to the removed channel, or kept one that does, the two
models disagree (or the pruned one fails to run).
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse.prune import apply_channel_surgery, channel_surgery_record, prune_channels


def masked_dense(dense: nn.Module, record: dict) -> nn.Module:
    """The dense model with every slice the record removed set to zero (running_var to 1 keeps BN finite)."""
    ref = copy.deepcopy(dense)
    tensors = dict(ref.named_parameters())
    tensors.update(dict(ref.named_buffers()))
    with torch.no_grad():
        for step in record["steps"]:
            assert len(record["steps"]) == 1
            for name, spec in step["params"].items():
                t = tensors[name]
                for d, keep in spec["keep"].items():
                    drop = sorted(set(range(t.shape[int(d)])) - set(keep))
                    t.index_fill_(int(d), torch.tensor(drop, dtype=torch.long), 1.0 if "running_var" in name else 0.0)
    return ref


def run_eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def prune_and_compare(model, x, ratio=0.4, exact=True, **kw):
    dense = copy.deepcopy(model).eval()
    ref_out = run_eval(dense, x)
    pruned, report = prune_channels(model, x, ratio=ratio, return_report=True, **kw)
    assert pruned is model
    assert report.ran and report.traced, str(report)
    out = run_eval(pruned, x)
    assert out.shape == ref_out.shape
    assert report.params_after < report.params_before, str(report)
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    if exact:
        record = channel_surgery_record(pruned)
        expected = run_eval(masked_dense(dense, record), x)
        assert rel_err(out, expected) < 1e-5, rel_err(out, expected)
    return pruned, report


def _init_bn(model, seed=0):
    """Random BatchNorm statistics and affine parameters, so BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


# ---- the hard cases, on small hand-built models ---------------------------------------------------------------
class ResidualFlatten(nn.Module):
    """Residual add and mul, concat, chunk, depthwise + grouped convs, SE, flatten of a 4x4 map into Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32))
        self.dw = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, groups=32), nn.BatchNorm2d(64), nn.Hardswish())
        self.grouped = nn.Conv2d(64, 48, 3, padding=1, groups=4)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(48, 16, 1), nn.ReLU(), nn.Conv2d(16, 48, 1),
                                nn.Sigmoid())
        self.side = nn.Conv2d(32, 24, 1)
        self.after_cat = nn.Sequential(nn.BatchNorm2d(72), nn.ReLU(), nn.Conv2d(72, 40, 1))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(20 * 16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        y = self.grouped(self.dw(x))
        y = y * self.se(y)
        z = torch.cat([y, self.side(x)], dim=1)
        a, b = self.after_cat(z).chunk(2, dim=1)
        h = self.pool(a * torch.sigmoid(b))
        return self.fc(torch.flatten(h, 1))


def test_hard_cases_exact():
    torch.manual_seed(0)
    model = _init_bn(ResidualFlatten())
    x = torch.randn(2, 3, 20, 20)
    pruned, report = prune_and_compare(model, x, round_to=1)
    assert pruned.stem[0].out_channels == pruned.b1[3].out_channels < 32          # residual stream shrank as one
    assert pruned.dw[0].groups == pruned.dw[0].in_channels < 32                     # depthwise: whole groups
    assert pruned.dw[0].out_channels == 2 * pruned.dw[0].in_channels
    assert pruned.grouped.groups == 4 and pruned.grouped.in_channels % 4 == 0 and pruned.grouped.out_channels % 4 == 0
    assert pruned.grouped.out_channels == pruned.se[3].out_channels                 # SE scale follows its input
    assert pruned.fc.in_features == 16 * pruned.after_cat[2].out_channels // 2      # flatten: 16 positions/channel
    assert pruned.after_cat[2].out_channels % 2 == 0                                # chunk(2) halves stay equal
    assert pruned.after_cat[0].num_features == pruned.grouped.out_channels + pruned.side.out_channels
    assert pruned.fc.out_features == 10 and "model output" in report.unpruned()["fc"]


def test_round_to_keeps_multiples_of_8():
    torch.manual_seed(1)
    model = _init_bn(ResidualFlatten())
    pruned, _ = prune_and_compare(model, torch.randn(1, 3, 16, 16), ratio=0.3, round_to=8)
    for name in ("stem.0", "side", "se.1"):
        conv = pruned.get_submodule(name)
        assert conv.out_channels % 8 == 0, (name, conv.out_channels)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.gn = nn.GroupNorm(4, 32)
        self.c2 = nn.Conv2d(32, 24, 3, padding=1)
        self.ln = nn.LayerNorm(24)
        self.fc1 = nn.Linear(24, 64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x):
        x = self.c2(F.gelu(self.gn(self.c1(x))))
        x = self.ln(x.permute(0, 2, 3, 1))             # channels-last LayerNorm, as in ConvNeXt
        return self.fc2(F.gelu(self.fc1(x))).mean((1, 2))


def test_group_and_layer_norm():
    torch.manual_seed(2)
    pruned, _ = prune_and_compare(Norms(), torch.randn(1, 3, 12, 12), ratio=0.5, exact=False, round_to=1)
    assert pruned.gn.num_channels == pruned.c1.out_channels < 32 and pruned.c1.out_channels % 4 == 0
    assert pruned.ln.normalized_shape == (pruned.c2.out_channels,) and pruned.c2.out_channels < 24
    assert pruned.fc1.out_features < 64


class TinyTransformer(nn.Module):
    def __init__(self, d=32, heads=4, norm=True):
        super().__init__()
        self.embed = nn.Linear(12, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln = nn.LayerNorm(d) if norm else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp(self.ln(x))
        return self.head(x[:, 0])


@pytest.mark.parametrize("norm", [True, False], ids=["layernorm", "no_norm_exact"])
def test_multihead_attention_heads_stay_whole(norm):
    torch.manual_seed(3)
    # Without LayerNorm (whose statistics see the removed channels) pruning is exact: the query scaling keeps the
    # attention temperature of the smaller head_dim equal to the dense one.
    pruned, _ = prune_and_compare(TinyTransformer(norm=norm), torch.randn(2, 7, 12), ratio=0.5, exact=not norm,
                                  round_to=1)
    attn = pruned.attn
    assert attn.embed_dim < 32 and attn.embed_dim % attn.num_heads == 0
    assert attn.head_dim * attn.num_heads == attn.embed_dim == attn.in_proj_weight.shape[1]
    assert attn.in_proj_weight.shape[0] == 3 * attn.embed_dim
    assert pruned.mlp[0].out_features < 128


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        return self.fc(x.view(x.size(0), 16, -1).mean(-1))   # 16 is a literal: those channels must stay


def test_hard_coded_view_keeps_its_channels_and_says_why():
    torch.manual_seed(4)
    pruned, report = prune_and_compare(HardCodedView(), torch.randn(1, 3, 8, 8), ratio=0.5, round_to=1)
    assert pruned.b.out_channels == 16 and pruned.a.out_channels < 16
    assert "hard-coded size 16" in report.unpruned()["b"]


class SizeFromOtherTensor(nn.Module):
    """b's reshape takes its size from a's channel count: neither a's nor b's channels may shrink."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 64, 1)
        self.b = nn.Conv2d(3, 32, 1)
        self.fa = nn.Linear(64, 32)
        self.fc = nn.Linear(32, 40)
        self.out = nn.Linear(40, 2)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = b.reshape(b.size(0), a.size(1) // 2, -1).mean(-1) + self.fa(a.mean((2, 3)))
        return self.out(torch.relu(self.fc(y)))


def test_size_read_from_other_channels_is_pinned():
    torch.manual_seed(5)
    pruned, report = prune_and_compare(SizeFromOtherTensor(), torch.randn(1, 3, 6, 6), ratio=0.5, round_to=1,
                                       exact=False)
    assert pruned.b.out_channels == 32 and pruned.a.out_channels == 64 and pruned.fc.out_features == 20
    assert "other channels" in report.unpruned()["b"] and "other channels" in report.unpruned()["a"]
    assert not [f for f in report.families if f.status == "rolled back"]


class RuntimeCheck(nn.Module):
    """A size check that only fails when the model runs: the analysis cannot see it, the rollback must."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(16, 24, 1)
        self.c = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        torch._assert(h.shape[1] == 24, "b must keep 24 channels")
        return self.c(torch.relu(h))


def test_rollback_when_pruning_breaks_the_model():
    torch.manual_seed(5)
    model = RuntimeCheck()
    x = torch.randn(1, 3, 6, 6)
    pruned, report = prune_and_compare(model, x, ratio=0.5, round_to=1)
    assert pruned.b.out_channels == 24 and pruned.a.out_channels == 8
    rolled = [f for f in report.families if f.status == "rolled back"]
    assert len(rolled) == 1 and "b must keep 24 channels" in rolled[0].reason
    assert "rolled back" in report.unpruned()["b"]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:          # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return self.b(x)


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Untraceable()
        self.c = nn.Conv2d(16, 32, 1)
        self.d = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.d(torch.relu(self.c(self.inner(x))))


def test_untraceable_submodule_is_kept_whole():
    torch.manual_seed(6)
    pruned, report = prune_and_compare(WithUntraceable(), torch.randn(1, 3, 8, 8), ratio=0.5, round_to=1)
    assert pruned.inner.a.out_channels == 16 and pruned.inner.b.out_channels == 16
    assert pruned.c.out_channels < 32
    assert any("inner" in n and "not traceable" in n for n in report.notes)


def test_filter_fn_excludes_layers():
    torch.manual_seed(7)
    model = _init_bn(ResidualFlatten())
    pruned, report = prune_and_compare(model, torch.randn(1, 3, 16, 16), round_to=1,
                                       filter_fn=lambda name, m: name != "side")
    assert pruned.side.out_channels == 24 and pruned.side.in_channels == 32     # and so the whole residual stream
    assert "filter_fn" in report.unpruned()["side"]


def test_record_round_trip_on_fresh_model():
    torch.manual_seed(8)
    model = _init_bn(ResidualFlatten())
    x = torch.randn(1, 3, 16, 16)
    pruned = prune_channels(model, x, ratio=0.4)
    record = json.loads(json.dumps(channel_surgery_record(pruned)))   # plain JSON data
    fresh = apply_channel_surgery(ResidualFlatten(), record)
    fresh.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(run_eval(fresh, x), run_eval(pruned, x), rtol=0, atol=0)
    assert channel_surgery_record(fresh) == record
    # undo (for a loader that fails later) restores the dense model exactly
    other = ResidualFlatten()
    dense_state = copy.deepcopy(other.state_dict())
    _, undo = apply_channel_surgery(other, record, return_undo=True)
    assert other.stem[0].out_channels == pruned.stem[0].out_channels
    undo()
    assert other.stem[0].out_channels == 32 and channel_surgery_record(other) is None
    assert all(torch.equal(dense_state[k], v) for k, v in other.state_dict().items())
    run_eval(other, x)


def test_bad_record_raises_and_leaves_model_unchanged():
    torch.manual_seed(9)
    x = torch.randn(1, 3, 16, 16)
    record = channel_surgery_record(prune_channels(_init_bn(ResidualFlatten()), x, ratio=0.4))
    fresh = ResidualFlatten()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    bad = copy.deepcopy(record)
    name = next(iter(bad["steps"][0]["params"]))
    dim = next(iter(bad["steps"][0]["params"][name]["keep"]))
    bad["steps"][0]["params"][name]["keep"][dim] = [0, 10 ** 6]
    with pytest.raises(ValueError, match="strictly increasing"):
        apply_channel_surgery(fresh, bad)
    with pytest.raises(ValueError, match="no parameter"):
        apply_channel_surgery(fresh, {"version": 1, "steps": [{"params": {"nope.weight": {"shape": [1]}},
                                                               "modules": {}}]})
    bad = copy.deepcopy(record)
    bad["steps"][0]["modules"]["stem.0"] = {"forward": 3}
    with pytest.raises(ValueError, match="attributes must be among"):
        apply_channel_surgery(fresh, bad)
    with pytest.raises(ValueError, match="version"):
        apply_channel_surgery(fresh, {"steps": []})
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_argument_errors():
    m = nn.Linear(4, 4)
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="ratio"):
        prune_channels(m, x, ratio=1.0)
    with pytest.raises(ValueError, match="norm"):
        prune_channels(m, x, norm="l3")
    with pytest.raises(ValueError, match="round_to"):
        prune_channels(m, x, round_to=0)
    with pytest.raises(TypeError, match="example_inputs"):
        prune_channels(m, "x")
    with pytest.raises(TypeError, match="model"):
        prune_channels(object(), x)
    with pytest.raises(ValueError, match="does not run"):
        prune_channels(m, torch.randn(1, 5))


def test_ratio_zero_changes_nothing():
    model = _init_bn(ResidualFlatten())
    x = torch.randn(1, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    pruned, report = prune_channels(model, x, ratio=0.0, return_report=True)
    assert report.params_after == report.params_before and channel_surgery_record(pruned) is None
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


# ---- torchvision: the CI handful (resnet18 in the fast run; the rest, 10-60 s each, are marked slow) -----------
def _slow(*case):
    return pytest.param(*case, marks=pytest.mark.slow)


@pytest.mark.parametrize("name,size,exact", [
    ("resnet18", 64, True), _slow("mobilenet_v2", 64, True), _slow("densenet121", 64, True),
    _slow("efficientnet_b0", 64, True), _slow("convnext_tiny", 64, False), _slow("vit_b_16", 224, False),
    _slow("shufflenet_v2_x0_5", 64, True),
])
def test_torchvision_models(name, size, exact):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _init_bn(torchvision.models.get_model(name, weights=None))
    flops_ratio_ok = name != "vit_b_16"  # ViT's residual width is a hard-coded reshape: only its MLPs shrink
    _, report = prune_and_compare(model, torch.randn(1, 3, size, size), ratio=0.3, exact=exact)
    assert report.flops_after < report.flops_before * (0.75 if flops_ratio_ok else 0.9), str(report)[:400]


# ---- accuracy: prune 50% of a small CNN's channels on load_digits, fine-tune, compare with dense ---------------
@pytest.mark.slow
def test_digits_cnn_channel_pruning_50pct_stays_within_2_points():
    pytest.importorskip("sklearn")
    from pysparse import demo  # the demo's CNN rows run this same flow

    x_train, y_train, x_test, y_test = demo.load_data(0)
    r = demo.cnn_channel_pruning(x_train.reshape(-1, 1, 8, 8), y_train, x_test.reshape(-1, 1, 8, 8), y_test)
    report = r["report"]
    print(f"digits CNN: dense {r['dense_accuracy']:.4f}, 50% channels one-shot {r['one_shot']:.4f}, fine-tuned "
          f"{r['fine_tuned']:.4f}, params {report.params_before} -> {report.params_after}, FLOPs "
          f"{report.flops_before} -> {report.flops_after}")
    assert r["pruned"].features[0].out_channels == 16 and r["pruned"].features[3].out_channels == 32
    assert r["dense_accuracy"] > 0.95 and r["fine_tuned"] >= r["dense_accuracy"] - 0.02


class TrainOnlyAux(nn.Module):
    """An auxiliary head used only in training (as GoogLeNet / Inception): a consumer of pruned channels that an
    eval-mode trace never sees. Its 5x5 kernel does not fit the small example input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                  nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 5), nn.Flatten(1),
                                 nn.LazyLinear(3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(32, 3))

    def forward(self, x):
        h = self.body(x)
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_train_only_branch_is_coupled_even_when_it_cannot_run_at_the_example_size():
    torch.manual_seed(10)
    model = TrainOnlyAux()
    model.train()(torch.randn(2, 3, 6, 6))  # materialise the lazy layer at the training size
    pruned, report = prune_channels(model.eval(), torch.randn(1, 3, 4, 4), ratio=0.5, round_to=1,
                                    return_report=True)
    assert report.ran and pruned.body[0].out_channels < 32
    assert pruned.aux[0].in_channels == pruned.body[2].out_channels       # the train-only consumer followed
    assert any("train mode" in n for n in report.notes)
    with torch.no_grad():
        out, aux = pruned.train()(torch.randn(2, 3, 6, 6))
    assert out.shape == (2, 3) and aux.shape == (2, 3)


def test_pruning_twice_records_two_steps_that_replay():
    torch.manual_seed(11)
    model = _init_bn(ResidualFlatten())
    x = torch.randn(1, 3, 16, 16)
    prune_channels(model, x, ratio=0.3, round_to=1)
    prune_channels(model, x, ratio=0.3, round_to=1)
    record = channel_surgery_record(model)
    assert len(record["steps"]) == 2
    fresh = apply_channel_surgery(ResidualFlatten(), record)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(run_eval(fresh, x), run_eval(model, x), rtol=0, atol=0)


class SharedConv(nn.Module):
    """One conv applied twice (shared weights) and a residual around it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.head(x)


def test_shared_module_is_pruned_consistently():
    torch.manual_seed(12)
    pruned, _ = prune_and_compare(SharedConv(), torch.randn(1, 3, 8, 8), ratio=0.5, round_to=1)
    assert pruned.shared.in_channels == pruned.shared.out_channels == pruned.stem.out_channels < 16
