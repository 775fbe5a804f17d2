"""prune_: layer choice, scopes, overrides, and masks held through optimizers, deepcopy, state_dict and compile."""
import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pysparse.prune import (apply_masks, get_masks, magnitude_mask, mask_sparsity, masks_from_state_dict,
                            prunable_layers, prune_, remove_masks)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(20, 24), act=nn.ReLU(), fc2=nn.Linear(24, 32), act2=nn.ReLU(),
                                     out=nn.Linear(32, 5)))


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU(), flat=nn.Flatten(),
                                     fc=nn.Linear(8 * 6 * 6, 16), out=nn.Linear(16, 4)))


def block_keep(mask, bh, bw):
    rows, cols = mask.shape
    return torch.tensor([[bool(mask[r:r + bh, c:c + bw].any()) for c in range(0, cols, bw)]
                         for r in range(0, rows, bh)])


def train_steps(model, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_held(model, masks):
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert bool((w[~mask] == 0).all()), f"{name}: pruned weights revived"
        assert bool((w[mask] != 0).all()), f"{name}: kept weights were zeroed"


# ---- which layers, how much -----------------------------------------------------------------------------------
def test_default_layers_skip_output_and_too_small():
    model = net()
    assert list(prunable_layers(model, pattern="block", block_size=(4, 4))) == ["fc1", "fc2"]
    assert list(prunable_layers(model, pattern="block", block_size=(24, 24))) == ["fc2"]  # fc1 is 24x20
    assert list(prunable_layers(model, lambda n, m: n != "fc1")) == ["fc2", "out"]
    assert list(prunable_layers(convnet(), pattern="unstructured")) == ["conv", "fc"]


@pytest.mark.parametrize("pattern", ["unstructured", "block", "nm", "channel"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_layer_scope_equals_magnitude_mask_per_layer(pattern, norm):
    model = net()
    expected = {n: magnitude_mask(model.get_submodule(n).weight, sparsity=0.6, norm=norm, pattern=pattern,
                                  block_size=(4, 3)) for n in ("fc1", "fc2")}
    masks = prune_(model, sparsity=0.6, norm=norm, pattern=pattern, block_size=(4, 3))
    assert masks.keys() == expected.keys()
    for n in masks:
        assert torch.equal(masks[n], expected[n])
    assert_held(model, masks)
    assert not parametrize.is_parametrized(model.out)


def test_conv_layers_are_pruned_too():
    model = convnet()
    masks = prune_(model, sparsity=0.5, pattern="channel")
    assert set(masks) == {"conv", "fc"}
    assert int((~masks["conv"]).reshape(8, -1).all(1).sum()) == 4
    out = model(torch.randn(2, 3, 6, 6))
    assert out.shape == (2, 4)


def test_global_scope_hits_total_sparsity_and_each_layer_keeps_a_group():
    model = net()
    masks = prune_(model, sparsity=0.9, pattern="block", block_size=(4, 4), scope="global")
    sizes = {n: m.numel() for n, m in masks.items()}
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert abs(pruned - 0.9 * sum(sizes.values())) <= 8   # within half a 4x4 block of the target
    for m in masks.values():
        assert m.any()
    assert mask_sparsity(model) == pytest.approx(pruned / sum(sizes.values()))


def test_global_scope_is_scale_free_per_layer_unlike_raw_norms():
    # Scaling one layer's weights by 100 changes no layer's mask in global scope (scores are comparable), while
    # ranking raw norms would then prune the other layer almost entirely.
    a, b = net(), net()
    with torch.no_grad():
        b.fc2.weight.mul_(100)
    ma = prune_(a, sparsity=0.7, pattern="block", block_size=(4, 4), scope="global")
    mb = prune_(b, sparsity=0.7, pattern="block", block_size=(4, 4), scope="global")
    for n in ma:
        assert torch.equal(ma[n], mb[n])
    per_layer = {n: float((~m).float().mean()) for n, m in ma.items()}
    assert per_layer["fc1"] != per_layer["fc2"]   # global allocates sparsity unevenly, unlike layer scope


def test_threshold_is_absolute_in_both_scopes():
    a, b = net(), net()
    ma = prune_(a, threshold=0.05, pattern="unstructured", scope="layer")
    mb = prune_(b, threshold=0.05, pattern="unstructured", scope="global")
    for n in ma:
        assert torch.equal(ma[n], mb[n])
        assert torch.equal(ma[n], a.get_submodule(n).weight.abs() >= 0.05)


def test_overrides_and_filter_fn():
    model = net()
    masks = prune_(model, sparsity=0.5, pattern="unstructured", overrides={"fc2": 0.9, "out": 0.2})
    assert set(masks) == {"fc1", "fc2", "out"}
    for name, s in (("fc1", 0.5), ("fc2", 0.9), ("out", 0.2)):
        assert int((~masks[name]).sum()) == round(s * masks[name].numel())
    only = prune_(net(), overrides={"fc1": 0.25}, pattern="unstructured")
    assert set(only) == {"fc1"}
    filtered = prune_(net(), sparsity=0.5, pattern="unstructured", filter_fn=lambda n, m: n == "out")
    assert set(filtered) == {"out"}


def test_global_with_override_keeps_the_override_exact():
    model = net()
    masks = prune_(model, sparsity=0.8, pattern="unstructured", scope="global", overrides={"fc1": 0.1})
    assert int((~masks["fc1"]).sum()) == round(0.1 * masks["fc1"].numel())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sparsity=0.5, scope="model"), ValueError, r"scope must be 'layer' or 'global', got 'model'"),
    (dict(sparsity=0.5, overrides={"act": 0.5}), ValueError, r"overrides names 'act'.*layers are \['fc1'"),
    (dict(sparsity=0.5, overrides={"fc1": 2.0}), ValueError, r"overrides\['fc1'\] must be in \[0, 1\]"),
    (dict(sparsity=0.5, filter_fn=lambda n, m: False), ValueError, r"no layer to prune"),
    (dict(sparsity=0.5, pattern="unstructured", importance={"fc1": torch.ones(3)}), ValueError,
     r"importance\['fc1'\] must be a tensor of the weight's shape \(24, 20\), got \(3,\)"),
    (dict(sparsity=0.5), ValueError, r"no layer to prune.*block_size \(32, 32\)"),
    (dict(sparsity=0.5, threshold=1.0), ValueError, r"exactly one of sparsity or threshold"),
    (dict(sparsity=1.2), ValueError, r"sparsity must be in \[0, 1\]"),
    (dict(sparsity=0.5, pattern="block", block_size=(40, 4), filter_fn=lambda n, m: n == "fc1"), ValueError,
     r"block_size \(40, 4\) is larger than"),
])
def test_prune_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        prune_(net(), **kwargs)


def test_prune_rejects_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module, got Tensor"):
        prune_(torch.ones(3), sparsity=0.5)


# ---- holding the masks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
], ids=["adam", "adamw", "sgd-nesterov", "rmsprop"])
def test_masks_held_through_optimizer_with_momentum_from_before_pruning(make_opt):
    model = net()
    optimizer = make_opt(model.parameters())
    train_steps(model, optimizer, 5)           # momentum/second moments built on the dense weights
    masks = prune_(model, sparsity=0.7, pattern="block", block_size=(4, 4))
    for step in range(5):
        train_steps(model, optimizer, 1, seed=step)
        assert_held(model, masks)
    removed = remove_masks(model)
    assert_held(model, removed)
    assert isinstance(model.fc1.weight, nn.Parameter) and not parametrize.is_parametrized(model.fc1)


def test_prune_keeps_parameter_identity_for_existing_optimizers():
    model = net()
    weight = model.fc1.weight
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks = prune_(model, sparsity=0.5, pattern="unstructured")
    train_steps(model, optimizer, 3)
    assert_held(model, masks)
    remove_masks(model)
    assert model.fc1.weight is weight
    assert bool((weight[~masks["fc1"]] == 0).all())


def test_reprune_extends_mask_and_revived_entries_restart_at_zero():
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 3)
    first = prune_(model, sparsity=0.5, pattern="unstructured")
    train_steps(model, optimizer, 3)            # Adam moves the hidden pruned values
    second = prune_(model, sparsity=0.8, pattern="unstructured")
    for n in first:
        assert not bool((second[n] & ~first[n]).any())   # pruned entries rank lowest: the mask only grows
    apply_masks(model, {"fc1": torch.ones_like(second["fc1"])})
    assert bool((model.fc1.weight[~second["fc1"]] == 0).all())
    assert torch.equal(get_masks(model)["fc1"], torch.ones_like(second["fc1"]))


def test_deepcopy_is_independent_and_remove_on_copy_leaves_original():
    model = net()
    masks = prune_(model, sparsity=0.6, pattern="block", block_size=(4, 4))
    clone = copy.deepcopy(model)
    train_steps(clone, torch.optim.Adam(clone.parameters(), lr=1e-2), 3)
    assert_held(clone, masks)
    remove_masks(clone)
    x = torch.randn(4, 20)
    model(x)                                     # the original still has its masked weight property
    assert_held(model, masks)
    clone2 = copy.deepcopy(model)
    remove_masks(model)                          # and the other way round
    assert_held(clone2, masks)
    assert torch.equal(get_masks(clone2)["fc1"], masks["fc1"])


def test_state_dict_round_trip_into_fresh_models():
    model = net()
    prune_(model, sparsity=0.6, pattern="block", block_size=(4, 4))
    train_steps(model, torch.optim.Adam(model.parameters(), lr=1e-2), 3)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    x = torch.randn(4, 20)
    want = model(x)
    masks = get_masks(model)

    same_recipe = net(seed=1)                   # other weights, so prune_ picks other masks; the load replaces them
    prune_(same_recipe, sparsity=0.6, pattern="block", block_size=(4, 4))
    same_recipe.load_state_dict(state)
    fresh = net(seed=2)
    apply_masks(fresh, masks_from_state_dict(state))
    fresh.load_state_dict(state)
    for restored in (same_recipe, fresh):
        assert torch.equal(restored(x), want)
        for n, m in masks.items():
            assert torch.equal(get_masks(restored)[n], m)
        train_steps(restored, torch.optim.Adam(restored.parameters(), lr=1e-2), 2)
        assert_held(restored, masks)


def test_remove_masks_state_dict_loads_into_plain_model():
    model = net()
    prune_(model, sparsity=0.5, pattern="unstructured")
    remove_masks(model)
    plain = net(seed=3)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 20)
    assert torch.equal(plain(x), model(x))


def test_dtype_and_device_moves_keep_masks():
    model = net()
    masks = prune_(model, sparsity=0.5, pattern="unstructured")
    model.to(torch.float64)
    assert model.fc1.weight.dtype == torch.float64 and get_masks(model)["fc1"].dtype == torch.bool
    assert_held(model, masks)


def test_apply_masks_bad_input():
    with pytest.raises(ValueError, match=r"masks\['fc1'\] must have the weight's shape \(24, 20\), got \(3,\)"):
        apply_masks(net(), {"fc1": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks names 'act'"):
        apply_masks(net(), {"act": torch.ones(1)})


def test_torch_compile_trains_with_masks_held():
    model = net()
    masks = prune_(model, sparsity=0.6, pattern="block", block_size=(4, 4))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 20)
    torch.testing.assert_close(compiled(x), reference(x))
    for m, opt_model in ((model, compiled), (reference, reference)):
        train_steps(opt_model, torch.optim.Adam(m.parameters(), lr=1e-2), 2)
    assert_held(model, masks)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)
