"""sparsegpt_: lower layer error than magnitude pruning, exact counts per pattern, masks held, any batch form."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse._weight_layout import weight_matrix
from pysparse.prune import get_masks, prune_
from pysparse.prune.sparsegpt import _input_matrix, _inverse_cholesky, _prune_matrix, sparsegpt_

def ALL(name, module):  # a filter_fn that takes every layer
    return True


def correlated(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs whose k features are mixtures of k // 4 sources plus a little noise (strongly correlated)."""
    mix = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(7))
    return torch.randn(n, k // 4, generator=gen) @ mix + 0.1 * torch.randn(n, k, generator=gen)


def linear(k=64, n=48, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(fc=nn.Linear(k, n)))


def output_error(model, reference, x) -> float:
    with torch.no_grad():
        want = reference(x)
        return ((model(x) - want).norm() / (want - reference[0].bias).norm()).item()


@pytest.mark.parametrize("options", [
    {"pattern": "unstructured", "sparsity": 0.5},
    {"pattern": "unstructured", "sparsity": 0.75},
    {"pattern": "nm", "sparsity": 0.5, "nm": (2, 4)},
    {"pattern": "block", "sparsity": 0.5, "block_size": (4, 4)},
    {"pattern": "block", "sparsity": 0.5, "block_size": (16, 1)},
], ids=["unstructured-50", "unstructured-75", "2:4", "block-4x4", "vectors-16x1"])
def test_layer_error_below_magnitude_and_exact_counts(options):
    gen = torch.Generator().manual_seed(1)
    calibration = [correlated(128, 64, gen) for _ in range(4)]
    test_x = correlated(512, 64, gen)
    dense = linear()
    ours, magnitude = linear(), linear()
    masks = sparsegpt_(ours, calibration, filter_fn=ALL, **options)
    expected = prune_(magnitude, norm="l2", filter_fn=ALL, **options)
    assert list(masks) == ["fc"]
    # the same number of pruned entries as prune_ at the same settings
    assert int((~masks["fc"]).sum()) == int((~expected["fc"]).sum())
    assert output_error(ours, dense, test_x) < 0.85 * output_error(magnitude, dense, test_x)
    assert bool((ours.fc.weight[~masks["fc"]] == 0).all())
    assert torch.equal(get_masks(ours)["fc"], masks["fc"])


def test_nm_masks_are_n_of_m_and_blocks_are_whole_tiles():
    gen = torch.Generator().manual_seed(2)
    calibration = [correlated(64, 64, gen)]
    model = linear()
    keep = sparsegpt_(model, calibration, sparsity=0.5, pattern="nm", nm=(2, 4), filter_fn=ALL)["fc"]
    assert bool((keep.reshape(48, 16, 4).sum(-1) == 2).all())
    model = linear()
    keep = sparsegpt_(model, calibration, sparsity=0.5, pattern="block", block_size=(8, 4), filter_fn=ALL)["fc"]
    tiles = keep.reshape(6, 8, 16, 4)
    assert bool((tiles.all(dim=(1, 3)) | ~tiles.any(dim=(1, 3))).all())     # every tile all kept or all pruned
    assert int((~tiles.any(dim=(1, 3))).sum()) == 48                         # half of the 96 tiles


def test_unstructured_counts_are_exact_on_ragged_shapes():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 23), nn.ReLU(), nn.Linear(23, 5))
    for sparsity in (0.0, 0.3, 1.0):
        masks = sparsegpt_(model, [torch.randn(40, 37, generator=gen)], sparsity=sparsity, filter_fn=ALL,
                           blocksize=8)
        for name, shape in (("0", (23, 37)), ("2", (5, 23))):
            assert masks[name].shape == shape
            assert int((~masks[name]).sum()) == round(sparsity * shape[0] * shape[1])


def test_sequential_layers_and_masks_held_through_training():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    dense = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    masks = sparsegpt_(model, [(correlated(64, 32, gen), None) for _ in range(2)], sparsity=0.6)
    assert list(masks) == ["0", "2"]                       # the output layer is left alone, as by prune_
    assert torch.equal(model[4].weight, dense[2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = correlated(16, 32, gen), torch.randint(0, 10, (16,), generator=gen)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, mask in masks.items():
        assert bool((model.get_submodule(name).weight[~mask] == 0).all())


def test_already_masked_model_is_pruned_again():
    gen = torch.Generator().manual_seed(5)
    model = linear()
    first = prune_(model, sparsity=0.3, pattern="unstructured", filter_fn=ALL)["fc"]
    second = sparsegpt_(model, [correlated(128, 64, gen)], sparsity=0.6, filter_fn=ALL)["fc"]
    assert int((~second).sum()) == round(0.6 * 64 * 48)
    assert torch.equal(get_masks(model)["fc"], second)
    assert bool((model.fc.weight[~second] == 0).all()) and not torch.equal(first, second)


def smooth_images(n: int, gen: torch.Generator) -> torch.Tensor:
    """8-channel images mixed from 2 source channels and blurred: correlated across channels and kernel taps."""
    mix = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(11))
    return F.avg_pool2d(F.conv2d(torch.randn(n, 2, 12, 12, generator=gen), mix), 3, 1, 1)


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 6, (2, 3), stride=2, dilation=(1, 2),
                                                                        padding=(1, 0)),
                                  nn.Conv1d(8, 5, 3, padding=2, dilation=2)], ids=["conv2d", "strided", "conv1d"])
def test_conv_input_rows_are_the_matrix_views_columns(conv):
    x = torch.randn(2, 8, 7, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 8, 11)
    with torch.no_grad():
        want = conv(x) - conv.bias.reshape(-1, *[1] * (x.dim() - 2))
        got = _input_matrix(conv, x, None) @ weight_matrix(conv.weight).T          # [B * positions, out]
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2).reshape(-1, want.shape[1]))


def test_conv2d_reduces_output_error_versus_magnitude():
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    ours, magnitude = (nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)) for _ in range(2))
    for m in (ours, magnitude):
        m[0].load_state_dict(conv.state_dict())
    masks = sparsegpt_(ours, [smooth_images(4, gen) for _ in range(3)], sparsity=0.5, filter_fn=ALL)
    prune_(magnitude, sparsity=0.5, pattern="unstructured", filter_fn=ALL)
    x = smooth_images(4, gen)
    with torch.no_grad():
        want = conv(x) - conv.bias[:, None, None]
        errors = [(m(x) - conv(x)).norm().item() / want.norm().item() for m in (ours, magnitude)]
    assert int((~masks["0"]).sum()) == 16 * 8 * 9 // 2
    assert errors[0] < 0.5 * errors[1]


def _bert(transformers):
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=160, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_tiny_bert_with_dict_batches():
    transformers = pytest.importorskip("transformers")
    model = _bert(transformers)
    gen = torch.Generator().manual_seed(8)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 120, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1:, 9:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})

    def encoder(name, module):
        return name.startswith("encoder.") and isinstance(module, nn.Linear)

    with torch.no_grad():
        want = model(**batches[0]).last_hidden_state
    masks = sparsegpt_(model, batches, sparsity=0.5, filter_fn=encoder)
    names = [n for n, m in model.named_modules() if encoder(n, m)]
    assert sorted(masks) == sorted(names) and len(names) == 12
    # forward order: each layer's query/key/value before its attention output, intermediate, output
    assert list(masks)[:6] == [f"encoder.layer.0.{s}" for s in ("attention.self.query", "attention.self.key",
                                                                 "attention.self.value", "attention.output.dense",
                                                                 "intermediate.dense", "output.dense")]
    for name, mask in masks.items():
        assert int((~mask).sum()) == mask.numel() // 2
        assert bool((model.get_submodule(name).weight[~mask] == 0).all())
    with torch.no_grad():
        got = model(**batches[0]).last_hidden_state
    assert torch.isfinite(got).all() and F.cosine_similarity(got, want, dim=-1).mean() > 0.5


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sparsity": 1.5}, ValueError, r"sparsity must be in \[0, 1\], got 1.5"),
    ({"sparsity": -0.1}, ValueError, r"sparsity must be in \[0, 1\]"),
    ({"sparsity": "half"}, TypeError, "sparsity must be a real number"),
    ({"sparsity": 0.5, "pattern": "channel"}, ValueError, "pattern must be one of"),
    ({"sparsity": 0.5, "pattern": "diagonal"}, ValueError, "pattern must be one of"),
    ({"sparsity": 0.7, "pattern": "nm"}, ValueError, r"sparsity must be 1 - N/M = 0.5 for pattern='nm'"),
    ({"sparsity": 0.5, "damp": 0}, ValueError, "damp must be a finite number > 0"),
    ({"sparsity": 0.5, "blocksize": 0}, ValueError, "blocksize must be an int >= 1"),
    ({"sparsity": 0.5, "calibration": []}, ValueError, "calibration must hold at least one batch, got none"),
    ({"sparsity": 0.5, "calibration": torch.randn(4, 8)}, TypeError, "calibration must be a sequence of batches"),
])
def test_bad_input(kwargs, error, match):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    calibration = kwargs.pop("calibration", [torch.randn(4, 8)])
    with pytest.raises(error, match=match):
        sparsegpt_(model, calibration, **kwargs)


def test_bad_layers():
    with pytest.raises(TypeError, match=r"sparsegpt_ prunes Linear, Conv1d and Conv2d layers with groups=1.*"
                                        r"'0 \(Conv2d, groups=2\)'"):
        sparsegpt_(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1)), [torch.randn(1, 4, 6, 6)],
                   sparsity=0.5)
    unused = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), b=nn.Linear(4, 4), out=nn.Linear(4, 2)))
    unused.forward = lambda x: unused.out(unused.a(x))
    with pytest.raises(ValueError, match=r"layers \['b'\] saw no input during calibration"):
        sparsegpt_(unused, [torch.randn(3, 4)], sparsity=0.5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsegpt_(lambda x: x, [torch.randn(3, 4)], sparsity=0.5)


def column_by_column(w, hinv, pruned, blocksize):
    """The paper's loop (Algorithm 1) with a given mask: every column pruned and its error spread, one by one."""
    w = w.clone()
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        w1, u1, err1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2], torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)
        for i in range(i2 - i1):
            q = torch.where(pruned[:, i1 + i], 0.0, w1[:, i])
            err1[:, i] = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err1[:, i:i + 1] * u1[i:i + 1, i:]
            w1[:, i] = q
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


@pytest.mark.parametrize("options", [
    {"pattern": "unstructured", "block_size": (1, 1)}, {"pattern": "block", "block_size": (4, 2)},
    {"pattern": "nm", "block_size": (1, 1)},
], ids=["unstructured", "block", "nm"])
def test_batched_solve_equals_the_papers_column_loop(options):
    gen = torch.Generator().manual_seed(9)
    x = correlated(256, 40, gen).double()
    w = torch.randn(12, 40, generator=gen, dtype=torch.float64)
    hinv = _inverse_cholesky(x.T @ x / 256, 0.01)
    new, keep = _prune_matrix(w, hinv, sparsity=0.5, nm=(2, 4), blocksize=16, **options)
    torch.testing.assert_close(new, column_by_column(w, hinv, ~keep, 16))


class InPlace(nn.Module):
    """``b`` reads the tensor ``a`` read, after ``a``'s output was added to it in place: b depends on a."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = x.clone()
        y = self.c(x)                       # c reads the same x as a, unchanged: pruned alongside a
        x += self.a(x)
        return self.out(self.b(x) + y)


def test_layers_sharing_an_input_are_grouped_unless_it_changed_in_place():
    from pysparse.prune.sparsegpt import _forward_order

    model = InPlace()
    counts, groups = _forward_order(model, {n: model.get_submodule(n) for n in ("a", "b", "c")}, torch.randn(3, 8))
    assert groups == [["c", "a"], ["b"]] and counts == {"a": 1, "b": 1, "c": 1}
