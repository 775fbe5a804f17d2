"""Taylor and Wanda importance from calibration batches, checked against direct computations, for every pattern."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse.prune import PATTERNS, magnitude_mask, prune_, taylor_scores, wanda_scores


def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(12, 16), act=nn.ReLU(), fc2=nn.Linear(16, 16), act2=nn.Tanh(),
                                     out=nn.Linear(16, 3)))


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_taylor_is_mean_abs_weight_times_grad_per_batch():
    model, data = net(), batches()
    expected = {n: torch.zeros(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n in expected:
            w = model.get_submodule(n).weight
            expected[n] += (w * w.grad).abs() / len(data)
    model.zero_grad(set_to_none=True)
    model.train()
    scores = taylor_scores(model, data, F.cross_entropy)
    assert scores.keys() == expected.keys()
    for n, want in expected.items():
        torch.testing.assert_close(scores[n], want)
    assert all(p.grad is None for p in model.parameters())   # calibration leaves .grad alone
    assert model.training                                     # and restores the mode


def test_taylor_on_masked_model_scores_pruned_entries_zero():
    model = net()
    masks = prune_(model, sparsity=0.5, pattern="unstructured")
    scores = taylor_scores(model, batches(), F.cross_entropy, names=["fc1"])
    assert list(scores) == ["fc1"]
    assert bool((scores["fc1"][~masks["fc1"]] == 0).all())
    assert bool((scores["fc1"][masks["fc1"]] > 0).any())


def test_wanda_linear_is_abs_weight_times_input_column_norm():
    model, data = net(), batches()
    x = torch.cat([b[0] for b in data])
    hidden = torch.relu(model.fc1(x))
    scores = wanda_scores(model, data, names=["fc1", "fc2"])
    torch.testing.assert_close(scores["fc1"], model.fc1.weight.detach().abs() * x.norm(dim=0))
    torch.testing.assert_close(scores["fc2"], model.fc2.weight.detach().abs() * hidden.detach().norm(dim=0))


def brute_conv_column_sumsq(conv, x):
    """Sum over batch and output positions of each (in-channel, kernel offset) input value squared, per group."""
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        kh, kw, (sh, sw), (dh, dw) = 1, conv.kernel_size[0], (1, conv.stride[0]), (1, conv.dilation[0])
        pad = (conv.padding[0], conv.padding[0], 0, 0)
    else:
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        pad = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
    x = F.pad(x, pad)
    _, c, h, w = x.shape
    cg = c // conv.groups
    out = torch.zeros(conv.groups, cg * kh * kw, dtype=torch.float64)
    for i in range(0, h - dh * (kh - 1), sh):
        for j in range(0, w - dw * (kw - 1), sw):
            patch = x[:, :, i:i + dh * (kh - 1) + 1:dh, j:j + dw * (kw - 1) + 1:dw]   # [b, c, kh, kw]
            out += patch.double().pow(2).sum(0).reshape(conv.groups, cg * kh * kw)
    return out


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, (2, 3), stride=2, dilation=(1, 2), padding=(1, 0), groups=2),
    nn.Conv1d(4, 6, 3, padding=2, groups=2, dilation=2),
], ids=["conv2d", "conv2d-grouped-strided", "conv1d-grouped"])
def test_wanda_conv_matches_brute_force_patch_norms(conv):
    torch.manual_seed(1)
    shape = (2, 4, 7, 9) if isinstance(conv, nn.Conv2d) else (2, 4, 11)
    data = [torch.randn(shape), torch.randn(shape)]
    scores = wanda_scores(conv, data)[""]
    sumsq = sum(brute_conv_column_sumsq(conv, x) for x in data)
    per_row = sumsq.sqrt()[torch.arange(6) // (6 // conv.groups)].float()
    torch.testing.assert_close(scores, (conv.weight.detach().abs().reshape(6, -1) * per_row).reshape(conv.weight.shape))


def test_wanda_keeps_weights_of_loud_inputs_that_magnitude_drops():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.1, 1.0, 1.0], [1.0, 0.1, 1.0, 1.0]]))
    x = torch.ones(5, 4)
    x[:, 1] = 100.0                     # input 1 is loud: its small weights matter most
    scores = wanda_scores(lin, [x])[""]
    assert not magnitude_mask(lin.weight, sparsity=0.25)[:, 1].any()
    assert magnitude_mask(scores, sparsity=0.25)[:, 1].all()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prune_with_importance_groups_like_magnitude(pattern):
    model = net()
    scores = wanda_scores(model, batches())
    expected = {n: magnitude_mask(scores[n], sparsity=0.5, pattern=pattern, block_size=(4, 4)) for n in ("fc1", "fc2")}
    masks = prune_(model, sparsity=0.5, pattern=pattern, block_size=(4, 4), importance=scores)
    for n, want in expected.items():
        assert torch.equal(masks[n], want)


class Tokens(nn.Module):
    """A model called with keyword inputs, as transformers models are: ``model(features=..., attention_mask=...)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, features, attention_mask=None):
        return self.out(torch.relu(self.fc(features))).mean(1)


def test_wanda_on_dict_batches_leaves_padding_out():
    model = Tokens()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    scores = wanda_scores(model, [{"features": x, "attention_mask": mask}], names=["fc"])["fc"]
    real = x[mask.bool()]                                   # the 5 real tokens' inputs
    torch.testing.assert_close(scores, model.fc.weight.detach().abs() * real.norm(dim=0))
    # the same batch as a plain tensor counts every position, padding included
    plain = wanda_scores(model.fc, [x])[""]
    torch.testing.assert_close(plain, model.fc.weight.detach().abs() * x.reshape(-1, 6).norm(dim=0))


def test_taylor_takes_dict_inputs():
    model = Tokens()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(2, 4, 6, generator=g), torch.randint(0, 3, (2,), generator=g)) for _ in range(2)]
    as_tensors = taylor_scores(model, data, F.cross_entropy)
    as_dicts = taylor_scores(model, [({"features": x}, y) for x, y in data], F.cross_entropy)
    assert as_dicts.keys() == as_tensors.keys() == {"fc", "out"}
    for n in as_tensors:
        torch.testing.assert_close(as_dicts[n], as_tensors[n])


def test_wanda_on_tiny_bert_tokenizer_style_batches():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    ids = torch.randint(0, 50, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    scores = wanda_scores(model, [batch, (batch, None)])
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert list(scores) == linears and all(bool((scores[n] > 0).any()) for n in linears)


def test_criteria_bad_input():
    with pytest.raises(ValueError, match="names holds 'act'"):
        wanda_scores(net(), batches(), names=["act"])
    with pytest.raises(ValueError, match="batches yielded no batch"):
        taylor_scores(net(), [], F.cross_entropy)
    with pytest.raises(ValueError, match="layer 'fc1' saw no input"):
        wanda_scores(net(), [])
    with pytest.raises(ValueError, match="names holds 'c'"):
        wanda_scores(nn.Sequential(OrderedDict(c=nn.Conv3d(1, 1, 1))), [], names=["c"])
