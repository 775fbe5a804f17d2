"""magnitude_mask: exact counts, threshold semantics, every pattern x norm, Linear and Conv weights, bad input."""
import math

import pytest
import torch

from pysparse.prune import NORMS, PATTERNS, magnitude_mask

SHAPES = [(10, 13), (32, 48), (7, 3, 3, 3)]   # odd Linear, even Linear, Conv [O, I, kh, kw]
BLOCK = (4, 5)                                 # divides none of the shapes above


def matrix(weight):
    """The [out, in] view patterns are defined on: Conv [O, I, kh, kw] is tap-major [O, kh*kw*I]."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1) if weight.dim() == 4 else weight


def group_norms(weight, pattern, norm, block_size=BLOCK):
    """Independent reference: per-group norms by explicit loops over the matrix view."""
    mat = matrix(weight).abs().double()
    p = 1 if norm == "l1" else 2
    rows, cols = mat.shape
    if pattern == "block":
        bh, bw = block_size
        return torch.tensor([[mat[r:r + bh, c:c + bw].pow(p).sum().pow(1 / p) for c in range(0, cols, bw)]
                             for r in range(0, rows, bh)])
    if pattern == "channel":
        return mat.pow(p).sum(1).pow(1 / p)
    return mat


def group_keep(mask, pattern, block_size=BLOCK):
    """Per-group keep flags read back from an entry mask, checking the mask is constant within each group."""
    mat = matrix(mask)
    rows, cols = mat.shape
    if pattern == "block":
        bh, bw = block_size
        tiles = [[mat[r:r + bh, c:c + bw] for c in range(0, cols, bw)] for r in range(0, rows, bh)]
        assert all(bool((t == t.flatten()[0]).all()) for row in tiles for t in row), "block mask not uniform"
        return torch.tensor([[bool(t.flatten()[0]) for t in row] for row in tiles])
    if pattern == "channel":
        assert bool((mat == mat[:, :1]).all()), "channel mask not uniform along a row"
        return mat[:, 0]
    return mat


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", ["unstructured", "block", "channel"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_exact_count_and_lowest_groups_pruned(shape, pattern, norm, sparsity):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = magnitude_mask(w, sparsity=sparsity, norm=norm, pattern=pattern, block_size=BLOCK)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    keep = group_keep(mask, pattern)
    norms = group_norms(w, pattern, norm)
    assert int((~keep).sum()) == round(sparsity * keep.numel())
    if keep.any() and (~keep).any():
        assert norms[~keep].max() <= norms[keep].min()


def test_l1_and_l2_rank_blocks_differently():
    # Block 0 holds one large entry (L2 = 3, L1 = 3); block 1 four medium ones (L2 = 2, L1 = 4).
    w = torch.zeros(2, 4)
    w[0, 0] = 3.0
    w[:, 2:] = 1.0
    l1 = magnitude_mask(w, sparsity=0.5, norm="l1", pattern="block", block_size=(2, 2))
    l2 = magnitude_mask(w, sparsity=0.5, norm="l2", pattern="block", block_size=(2, 2))
    assert l1[:, :2].logical_not().all() and l1[:, 2:].all()   # L1 prunes the single-spike block
    assert l2[:, 2:].logical_not().all() and l2[:, :2].all()   # L2 prunes the spread block


@pytest.mark.parametrize("pattern", ["unstructured", "nm"])
def test_single_entry_groups_same_for_both_norms(pattern):
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    assert torch.equal(magnitude_mask(w, sparsity=0.6, norm="l1", pattern=pattern),
                       magnitude_mask(w, sparsity=0.6, norm="l2", pattern=pattern))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("norm", NORMS)
def test_threshold_prunes_groups_strictly_below(pattern, norm):
    torch.manual_seed(2)
    w = torch.randn(12, 20)
    norms = group_norms(w, pattern, norm, block_size=(4, 4))
    threshold = float(norms.flatten().sort().values[norms.numel() // 3])   # an actual group norm: kept (not <)
    mask = magnitude_mask(w, threshold=threshold, norm=norm, pattern=pattern, block_size=(4, 4))
    if pattern == "nm":  # 2:4 is imposed, and entries below the threshold go too
        nm_only = magnitude_mask(w, sparsity=0.5, pattern="nm")
        assert torch.equal(mask, nm_only & (w.abs() >= threshold))
        return
    keep = group_keep(mask, pattern, block_size=(4, 4))
    assert torch.equal(keep, norms >= threshold)
    assert not bool(keep[norms == threshold].logical_not().any())


def test_threshold_zero_prunes_nothing_and_large_prunes_everything():
    w = torch.randn(8, 8)
    w[0] = 0
    assert magnitude_mask(w, threshold=0.0, pattern="channel").all()
    assert not magnitude_mask(w, threshold=1e9, pattern="block", block_size=4).any()


@pytest.mark.parametrize("pattern", ["unstructured", "block", "channel"])
def test_ties_broken_by_position(pattern):
    w = torch.ones(8, 8)
    mask = magnitude_mask(w, sparsity=0.25, pattern=pattern, block_size=(2, 2))
    keep = group_keep(mask, pattern, block_size=(2, 2)).flatten()
    pruned = round(0.25 * keep.numel())
    assert not keep[:pruned].any() and keep[pruned:].all()
    assert torch.equal(mask, magnitude_mask(w.clone(), sparsity=0.25, pattern=pattern, block_size=(2, 2)))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_conv_weight_uses_tap_major_view(pattern):
    # Conv patterns are drawn on [O, kh*kw*I], the view SparseConv2d packs, so block masks pack exactly.
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3)
    kwargs = dict(sparsity=0.5, pattern=pattern, block_size=(4, 6), nm=(2, 4))
    on_matrix = magnitude_mask(matrix(w), **kwargs)
    assert torch.equal(magnitude_mask(w, **kwargs), on_matrix.reshape(8, 3, 3, 4).permute(0, 3, 1, 2))


def test_block_ragged_edges_cover_whole_weight():
    w = torch.randn(10, 13)
    mask = magnitude_mask(w, sparsity=0.0, pattern="block", block_size=(4, 4))
    assert mask.all()
    mask = magnitude_mask(w, sparsity=1.0, pattern="block", block_size=(4, 4))
    assert not mask.any()


def test_block_norm_counts_only_covered_entries():
    # 5x5 with 4x4 blocks: the corner block covers one entry; scaled large it must survive as a large group.
    w = torch.full((5, 5), 0.1)
    w[4, 4] = 10.0
    mask = magnitude_mask(w, sparsity=0.75, pattern="block", block_size=(4, 4))
    assert mask[4, 4] and mask.sum() == 1


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (3, 3)])
@pytest.mark.parametrize("cols", [16, 19])
def test_nm_keeps_at_most_n_of_every_m(nm, cols):
    torch.manual_seed(4)
    n, m = nm
    w = torch.randn(6, cols)
    runs = [(c, min(c + m, cols)) for c in range(0, cols, m)]
    floor = sum(max(0, (b - a) - n) for a, b in runs) / cols
    for sparsity in sorted({floor, (1 + floor) / 2, 1.0}):
        mask = magnitude_mask(w, sparsity=sparsity, pattern="nm", nm=nm)
        assert int((~mask).sum()) == round(sparsity * w.numel())
        for a, b in runs:
            kept = mask[:, a:b]
            assert bool((kept.sum(1) <= n).all())
            if sparsity == floor:  # exact N:M: the N largest of each run are the ones kept
                top = w[:, a:b].abs().topk(min(n, b - a), dim=1).indices
                assert bool(kept.gather(1, top).all())


def test_nm_ragged_run_keeps_up_to_n():
    w = torch.arange(1.0, 6.0).reshape(1, 5)                 # runs [1 2 3 4] [5]
    mask = magnitude_mask(w, sparsity=0.4, pattern="nm", nm=(2, 4))
    assert mask.tolist() == [[False, False, True, True, True]]


def test_mask_on_weight_device_and_weight_untouched():
    w = torch.randn(16, 16, dtype=torch.bfloat16)
    before = w.clone()
    mask = magnitude_mask(w, sparsity=0.5, pattern="block", block_size=8)
    assert torch.equal(w, before) and mask.device == w.device and int((~mask).sum()) == 128


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sparsity=1.5), ValueError, r"sparsity must be in \[0, 1\], got 1.5"),
    (dict(sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\]"),
    (dict(sparsity=float("nan")), ValueError, r"sparsity must be in \[0, 1\]"),
    (dict(sparsity=True), TypeError, r"sparsity must be a real number"),
    (dict(sparsity=0.5, threshold=0.1), ValueError, r"exactly one of sparsity or threshold.*both"),
    (dict(), ValueError, r"exactly one of sparsity or threshold.*neither"),
    (dict(threshold=-1.0), ValueError, r"threshold must be a finite number >= 0, got -1.0"),
    (dict(threshold="1"), TypeError, r"threshold must be a real number"),
    (dict(sparsity=0.5, pattern="diagonal"), ValueError, r"pattern must be one of .*'diagonal'"),
    (dict(sparsity=0.5, norm="linf"), ValueError, r"norm must be one of .*'linf'"),
    (dict(sparsity=0.5, pattern="block", block_size=(16, 4)), ValueError, r"block_size \(16, 4\) is larger than"),
    (dict(sparsity=0.5, pattern="block", block_size=0), ValueError, r"block_size must be >= 1"),
    (dict(sparsity=0.5, pattern="nm", nm=(5, 4)), ValueError, r"nm=\(N, M\) needs N <= M.*\(5, 4\)"),
    (dict(sparsity=0.5, pattern="nm", nm=(2, 16)), ValueError, r"nm=\(2, 16\).*larger than"),
    (dict(sparsity=0.3, pattern="nm"), ValueError, r"sparsity must be >= 0.5 for this N:M pattern.*got 0.3"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        magnitude_mask(torch.randn(8, 12), **kwargs)


@pytest.mark.parametrize("weight, match", [
    (torch.randn(8), r"weight must be a floating-point tensor with >= 2 dims.*\(8,\)"),
    (torch.ones(4, 4, dtype=torch.int64), r"weight must be a floating-point tensor.*torch.int64"),
    ([[1.0]], r"weight must be a torch.Tensor, got list"),
    (torch.tensor([[1.0, math.nan]]), r"NaN or inf"),
])
def test_bad_weight(weight, match):
    with pytest.raises((TypeError, ValueError), match=match):
        magnitude_mask(weight, sparsity=0.5)
