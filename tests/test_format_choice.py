"""sparsify(block_size="auto") and the per-path format table behind it (pysparse.transforms.format_choice)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pysparse import ops, sparsify
from pysparse.bench.sweep import block_mask
from pysparse.formats import BlockSparseWeight
from pysparse.nn import SparseLinear, UnstructuredSparseLinear
from pysparse.transforms.format_choice import (CANDIDATES, DENSITIES, THROUGHPUT, choose_block_size, cpu_table_key,
                                               stored_entries)

SEED = 23


def block_pruned(n: int, k: int, block: tuple[int, int], density: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, k, generator=gen) * block_mask(n, k, block, 1.0 - density, gen)


@pytest.mark.parametrize("shape", [(37, 50), (64, 64), (5, 130)])
def test_stored_entries_match_the_packed_formats(shape):
    gen = torch.Generator().manual_seed(SEED)
    w = block_pruned(*shape, (4, 4), 0.4, gen) * (torch.rand(shape, generator=gen) < 0.7)
    for block in CANDIDATES:
        want = int((w != 0).sum()) if block == (1, 1) else BlockSparseWeight.from_dense(w, block).nnz_blocks * \
            block[0] * block[1]
        assert stored_entries(w, block) == want, block


def test_every_cpu_path_has_a_complete_table():
    assert {"avx512", "avx2", "generic"} <= set(THROUGHPUT)
    for path, table in THROUGHPUT.items():
        assert set(table) == set(CANDIDATES), path
        for block, points in table.items():
            assert tuple(d for d, _ in points) == DENSITIES and all(r > 0 for _, r in points), (path, block)


def test_a_vendor_table_is_used_only_where_there_is_one():
    assert cpu_table_key("avx512", "GenuineIntel") == "avx512/GenuineIntel"
    assert cpu_table_key("avx512", "AuthenticAMD") == "avx512"
    assert cpu_table_key("avx2", "GenuineIntel") == "avx2"
    assert cpu_table_key(ops.available_backends()["cpu"]) in THROUGHPUT   # this machine's own


def test_the_choice_follows_the_zeros():
    """Single entries for an unstructured weight, a block format for a block-pruned one; the explanation says so."""
    gen = torch.Generator().manual_seed(SEED + 1)
    path = ops.available_backends()["cpu"]
    unstructured = torch.randn(384, 384, generator=gen) * (torch.rand(384, 384, generator=gen) < 0.3)
    block, why = choose_block_size(unstructured, path=path, single_entries=True)
    assert block == (1, 1) and why.startswith("auto: 1x1")
    blocks = block_pruned(384, 384, (32, 32), 0.3, gen)
    block, _ = choose_block_size(blocks, path=path, single_entries=True)
    assert block[0] * block[1] >= 16 and stored_entries(blocks, block) == int((blocks != 0).sum())
    # Without single entries (a convolution), the unstructured weight gets some block format.
    assert choose_block_size(unstructured, path=path, single_entries=False)[0] != (1, 1)
    # No table (a GPU): the fewest stored entries among the large blocks.
    assert choose_block_size(blocks, path="cuda", single_entries=False)[0] in ((16, 16), (32, 32))
    # An all-zero weight: any candidate is exact; no division by zero in the explanation.
    assert choose_block_size(torch.zeros(20, 30), path=path, single_entries=True)[0] in CANDIDATES


def test_sparsify_auto_picks_per_layer_and_matches_dense():
    gen = torch.Generator().manual_seed(SEED + 2)
    model = nn.Sequential(nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(384, 256, generator=gen) < 0.3)       # unstructured
        model[2].weight.copy_(block_pruned(256, 384, (32, 32), 0.3, gen))   # blocks
    x = torch.randn(70, 256, generator=gen)
    for fuse in (False, True):
        out = sparsify(model, block_size="auto", min_sparsity=0.5, fuse_activations=fuse)
        report = out.sparsify_report
        assert isinstance(out[0], UnstructuredSparseLinear) and report["0"].block_size == (1, 1)
        assert isinstance(out[2], SparseLinear) and not isinstance(out[2], UnstructuredSparseLinear)
        assert report["2"].block_size == out[2].block_size and report["2"].reason.startswith("auto: ")
        assert type(out[4]) is nn.Linear and "< min_sparsity" in report["4"].reason  # dense: kept dense
        assert report.block_size == "auto" and report.to_dict()["block_size"] == "auto"
        assert "auto" in str(report) and "1x1" in str(report)
        want = model(x)
        assert ((out(x) - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("bad", ["fast", "AUTO", ""])
def test_sparsify_rejects_other_strings(bad):
    with pytest.raises(ValueError, match="block_size must be"):
        sparsify(nn.Linear(4, 4), block_size=bad)
