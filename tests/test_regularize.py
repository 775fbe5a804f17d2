"""SparsityRegularizer: penalties against hand-computed values, gradients, the proximal step against prune_'s
threshold, and bad input."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse.prune import SparsityRegularizer, fine_tune, get_masks, prune_


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and far faster than on two of a busy machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(5, 6), act=nn.ReLU(), fc2=nn.Linear(6, 3)))


def only_fc1(name, module):
    return name == "fc1"


def hand_block_norms(w, bh, bw, l2):
    """Norms of the (bh, bw) tiles of w, ragged at the edges, by explicit loops."""
    out = []
    for r in range(0, w.shape[0], bh):
        for c in range(0, w.shape[1], bw):
            tile = w[r:r + bh, c:c + bw].flatten().tolist()
            out.append(math.sqrt(sum(v * v for v in tile)) if l2 else sum(abs(v) for v in tile))
    return out


@pytest.mark.parametrize("pattern, norm", [("block", "group"), ("block", "l1"), ("channel", "group"),
                                           ("channel", "l1"), ("unstructured", "l1"), ("unstructured", "group")])
def test_penalty_equals_the_hand_computed_value(pattern, norm):
    model = net()
    reg = SparsityRegularizer(model, alpha=0.3, pattern=pattern, block_size=(4, 2), norm=norm, filter_fn=only_fc1)
    w = model.fc1.weight.detach().double()                       # [6, 5]: 4x2 tiles are ragged on both edges
    if pattern == "block":
        norms = hand_block_norms(w, 4, 2, norm == "group")
    elif pattern == "channel":
        norms = hand_block_norms(w, 1, 5, norm == "group")
    else:
        norms = w.abs().flatten().tolist()                       # single entries: L1 and L2 are both |w|
    assert reg.penalty().item() == pytest.approx(0.3 * sum(norms), rel=1e-6)
    assert len(reg.group_norms()["fc1"]) == len(norms)


def test_bn_penalty_is_l1_of_the_batchnorm_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        model[4].weight.copy_(torch.tensor([1.0, 1.0, -0.25, 3.0]))
    reg = SparsityRegularizer(model, alpha=0.1, pattern="bn")
    assert list(reg.layers) == ["1", "4"]
    assert reg.penalty().item() == pytest.approx(0.1 * (3.5 + 5.25))
    only_first = SparsityRegularizer(model, alpha=0.1, pattern="bn", filter_fn=lambda n, m: n == "1")
    assert only_first.penalty().item() == pytest.approx(0.35)


def test_conv_blocks_are_tiles_of_the_tap_major_matrix_view():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 2, 1))
    reg = SparsityRegularizer(model, alpha=1.0, pattern="block", block_size=(4, 3))
    view = conv.weight.detach().double().permute(0, 2, 3, 1).reshape(8, 27)   # [O, kh*kw*I]
    assert reg.penalty().item() == pytest.approx(sum(hand_block_norms(view, 4, 3, True)), rel=1e-6)


def test_gradient_reaches_only_the_chosen_layers():
    model = net()
    reg = SparsityRegularizer(model, alpha=1.0, pattern="block", block_size=(2, 2), filter_fn=only_fc1)
    reg.penalty().backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0
    assert model.fc2.weight.grad is None and model.fc1.bias.grad is None
    default = SparsityRegularizer(net(), alpha=1.0, pattern="unstructured")
    assert list(default.layers) == ["fc1"]                         # prune_'s default leaves the output layer out


def test_masked_layer_is_penalised_through_its_masked_value_and_zero_groups_get_zero_gradient():
    model = net()
    masks = prune_(model, sparsity=0.5, pattern="block", block_size=(2, 2), filter_fn=only_fc1, norm="l2")
    reg = SparsityRegularizer(model, alpha=1.0, pattern="block", block_size=(2, 2), filter_fn=only_fc1)
    w = model.fc1.weight.detach().double()
    assert reg.penalty().item() == pytest.approx(sum(hand_block_norms(w, 2, 2, True)), rel=1e-6)
    reg.penalty().backward()
    grad = model.fc1.parametrizations.weight.original.grad
    assert torch.isfinite(grad).all() and bool((grad[~masks["fc1"]] == 0).all())


def test_alpha_is_settable_and_scheduled():
    model = net()
    reg = SparsityRegularizer(model, alpha=1.0, pattern="unstructured", filter_fn=only_fc1,
                              alpha_schedule=lambda step: 0.1 * step)
    full = reg.penalty().item()
    reg.alpha = 0.5
    assert reg.penalty().item() == pytest.approx(0.5 * full)
    reg.update(3)
    assert reg.alpha == pytest.approx(0.3)
    bad = SparsityRegularizer(model, alpha=1.0, pattern="unstructured", alpha_schedule=lambda step: -1.0)
    with pytest.raises(ValueError, match=r"alpha_schedule\(2\) must be a finite number >= 0, got -1.0"):
        bad.update(2)


@pytest.mark.parametrize("pattern, norm, block", [("block", "group", (2, 2)), ("block", "l1", (2, 2)),
                                                  ("channel", "group", (1, 5)), ("unstructured", "l1", (1, 1))])
def test_proximal_step_zeroes_exactly_what_prune_at_a_small_threshold_removes(pattern, norm, block):
    model = net()
    reg = SparsityRegularizer(model, alpha=1.0, pattern=pattern, block_size=block, norm=norm, filter_fn=only_fc1)
    before = reg.group_norms()["fc1"].detach()
    # L2 groups shrink as wholes; L1 shrinks entries, so a 2x2 tile is zero only when its 4 entries all fall below
    lr = float(before.median()) if norm == "group" else float(model.fc1.weight.detach().abs().quantile(0.8))
    reg.proximal_step(lr)
    after = reg.group_norms()["fc1"].detach()
    zeroed = after == 0
    assert 0 < int(zeroed.sum()) < zeroed.numel()
    if norm == "group":                    # group soft-threshold: norm - lr*alpha, or 0 when below
        assert torch.equal(zeroed, before <= lr)
        assert torch.allclose(after[~zeroed], before[~zeroed] - lr, atol=1e-6)
    w = model.fc1.weight.detach().clone()
    gamma = float(after[~zeroed].min()) / 2
    masks = prune_(model, threshold=gamma, pattern=pattern, block_size=block, norm=reg.prune_norm,
                   filter_fn=only_fc1)
    kept_entries = hand_block_norms(masks["fc1"].double(), *block, False)
    assert torch.equal(torch.tensor(kept_entries) == 0, zeroed)      # prune_ removes exactly the zeroed groups
    assert torch.equal(model.fc1.weight.detach(), w)                  # which were exactly zero


def test_proximal_step_on_a_masked_layer_keeps_the_mask_and_zeroes_whole_blocks():
    model = net()
    prune_(model, sparsity=0.25, pattern="block", block_size=(2, 2), filter_fn=only_fc1)
    mask = get_masks(model)["fc1"].clone()
    reg = SparsityRegularizer(model, alpha=1.0, pattern="block", block_size=(2, 2), filter_fn=only_fc1)
    reg.proximal_step(float(reg.group_norms()["fc1"].detach().max()) / 2)
    assert torch.equal(get_masks(model)["fc1"], mask)
    w = model.fc1.weight.detach()
    assert bool((w[~mask] == 0).all()) and (w == 0).sum() > (~mask).sum()


def test_proximal_regularizer_in_fine_tune_drives_blocks_to_exact_zero():
    model = net()
    g = torch.Generator().manual_seed(1)
    data = [(x := torch.randn(16, 5, generator=g), (x[:, 0] > 0).long()) for _ in range(4)]
    reg = SparsityRegularizer(model, alpha=0.5, pattern="block", block_size=(2, 2), filter_fn=only_fc1,
                              proximal=True)
    history = fine_tune(model, data, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), steps=20,
                        regularizer=reg, progress=False)
    assert all("penalty" in h for h in history) and history[-1]["penalty"] < history[0]["penalty"]
    assert int((reg.group_norms()["fc1"] == 0).sum()) > 0


def test_penalty_in_fine_tune_shrinks_the_group_norms_against_plain_training():
    g = torch.Generator().manual_seed(1)
    data = [(x := torch.randn(16, 5, generator=g), (x[:, 0] > 0).long()) for _ in range(4)]
    final = {}
    for alpha in (0.0, 0.2):
        model = net()
        reg = SparsityRegularizer(model, alpha=alpha, pattern="block", block_size=(2, 2), filter_fn=only_fc1)
        history = fine_tune(model, data, F.cross_entropy, torch.optim.Adam(model.parameters(), lr=1e-2), steps=30,
                            regularizer=reg, progress=False)
        assert history[0]["penalty"] == pytest.approx(alpha * float(sum(hand_block_norms(
            net().fc1.weight.detach().double(), 2, 2, True))), rel=1e-5)
        reg.alpha = 1.0
        final[alpha] = reg.penalty().item()
    assert final[0.2] < 0.7 * final[0.0]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"alpha": -0.1}, ValueError, r"alpha must be a finite number >= 0, got -0.1"),
    ({"alpha": "1"}, TypeError, r"alpha must be a real number >= 0, got str"),
    ({"alpha": 1.0, "pattern": "nm"}, ValueError, r"pattern must be one of .*got 'nm'"),
    ({"alpha": 1.0, "norm": "l2"}, ValueError, r"norm must be one of \('group', 'l1'\), got 'l2'"),
    ({"alpha": 1.0, "block_size": (8, 2), "filter_fn": only_fc1}, ValueError,
     r"block_size \(8, 2\) is larger than layer 'fc1'.*\(6, 5\)"),
    ({"alpha": 1.0, "block_size": (8, 8)}, ValueError, r"no layer selected.*block_size \(8, 8\)"),
    ({"alpha": 1.0, "pattern": "bn"}, ValueError, r"no layer selected: pattern='bn' needs affine BatchNorm"),
    ({"alpha": 1.0, "block_size": 0}, ValueError, r"block_size"),
    ({"alpha": 1.0, "alpha_schedule": 3}, TypeError, r"alpha_schedule must be a callable"),
])
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparsityRegularizer(net(), **kwargs)


def test_bad_model_and_lr():
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        SparsityRegularizer({}, alpha=1.0)
    reg = SparsityRegularizer(net(), alpha=1.0, pattern="unstructured")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        reg.proximal_step(-1.0)
    with pytest.raises(ValueError, match="regularizer was built on another model"):
        fine_tune(net(), [(torch.zeros(2, 5), torch.zeros(2).long())], F.cross_entropy,
                  torch.optim.SGD(net().parameters(), lr=0.1), steps=1, regularizer=reg, progress=False)
