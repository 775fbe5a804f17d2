"""BlockSparseWeight: packing, exact round trips, padding at ragged edges, torch.sparse_bsr, density, nbytes,
validate."""
import pytest
import torch

from conftest import cuda_available, generator_for, make_case, sample_specs
from pysparse.formats import BlockSparseWeight

SPECS = sample_specs(dtypes=(torch.float32,))


def expected_blocks(keep: torch.Tensor, block_size) -> torch.Tensor:
    """[n_block_rows, n_block_cols] bool: which blocks hold at least one kept entry (computed by plain loops)."""
    bh, bw = block_size
    n, k = keep.shape
    out = torch.zeros(-(-n // bh), -(-k // bw), dtype=torch.bool)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[r, c] = bool(keep[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw].any())
    return out


def bsr_of(blocks: torch.Tensor):
    """crow_indices / col_indices a row-major block grid must pack to."""
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), blocks.sum(1).cumsum(0)]).to(torch.int32)
    col = torch.nonzero(blocks)[:, 1].to(torch.int32)
    return crow, col


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_from_dense_packs_the_right_blocks_and_round_trips(spec, device):
    case = make_case(spec, device)
    packed = case.packed
    keep = (case.mask if case.mask is not None else case.weight != 0).cpu()
    blocks = expected_blocks(keep, spec.block_size)
    crow, col = bsr_of(blocks)
    assert packed.shape == tuple(case.weight.shape) and packed.block_size == spec.block_size
    assert packed.values.device.type == device.type and packed.values.dtype == spec.dtype
    assert torch.equal(packed.crow_indices.cpu(), crow) and torch.equal(packed.col_indices.cpu(), col)
    assert packed.nnz_blocks == int(blocks.sum())
    assert packed.density == pytest.approx(blocks.float().mean().item() if blocks.numel() else 0.0)
    # Exact round trip of the kept entries, zeros elsewhere.
    assert torch.equal(packed.to_dense(), case.masked_weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_padding_at_ragged_edges_is_zero(dtype):
    """13 x 22 with 4 x 8 blocks: the last block row overhangs by 3, the last block column by 2."""
    weight = (torch.randn(13, 22, generator=generator_for("pad")) + 10).to(dtype)  # no accidental zeros
    packed = BlockSparseWeight.from_dense(weight, (4, 8))
    assert packed.values.shape == (4 * 3, 4, 8)
    grid = packed.values.view(4, 3, 4, 8)  # full pattern: [block row, block col, bh, bw]
    assert torch.all(grid[3, :, 1:, :] == 0), "rows past out_features must be stored as zeros"
    assert torch.all(grid[:, 2, :, 6:] == 0), "columns past in_features must be stored as zeros"
    assert torch.equal(packed.to_dense(), weight)


def test_mask_keeps_blocks_even_where_the_weight_is_zero():
    """A block the mask keeps is stored even if its weights happen to be zero (a pruning mask packs exactly)."""
    weight = torch.zeros(8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 5] = True
    packed = BlockSparseWeight.from_dense(weight, (4, 4), mask=mask)
    assert packed.crow_indices.tolist() == [0, 1, 1] and packed.col_indices.tolist() == [1]
    assert torch.equal(packed.to_dense(), weight)


def test_mask_zeroes_dropped_entries_inside_kept_blocks():
    weight = torch.arange(1, 17, dtype=torch.float32).view(4, 4)
    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    packed = BlockSparseWeight.from_dense(weight, (2, 2), mask=mask)
    assert packed.nnz_blocks == 1
    assert torch.equal(packed.to_dense(), weight * mask)


@pytest.mark.parametrize("shape,block_size", [((0, 10), (4, 4)), ((10, 0), (4, 4)), ((0, 0), (2, 3))])
def test_empty_shapes(shape, block_size):
    packed = BlockSparseWeight.from_dense(torch.randn(*shape), block_size)
    assert packed.nnz_blocks == 0 and packed.density == 0.0
    assert packed.to_dense().shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_sparse_bsr_round_trip(dtype):
    gen = generator_for(f"torch-bsr-{dtype}")
    keep = (torch.rand(3, 5, generator=gen) < 0.5).repeat_interleave(4, 0).repeat_interleave(8, 1)
    weight = (torch.randn(12, 40, generator=gen) * keep).to(dtype)
    packed = BlockSparseWeight.from_dense(weight, (4, 8))
    t = packed.to_torch_sparse()
    assert t.layout == torch.sparse_bsr and t.shape == (12, 40) and t.values().shape[1:] == (4, 8)
    assert torch.equal(t.to_dense(), weight)
    back = BlockSparseWeight.from_torch_sparse(t)
    for name in ("values", "crow_indices", "col_indices"):
        assert torch.equal(getattr(back, name), getattr(packed, name)), name
    # A tensor torch packed itself (int64 indices) converts too.
    theirs = BlockSparseWeight.from_torch_sparse(weight.to_sparse_bsr((4, 8)))
    assert theirs.crow_indices.dtype == torch.int32 and torch.equal(theirs.to_dense(), weight)


def test_torch_sparse_bsr_refuses_padded_weights_and_other_layouts():
    packed = BlockSparseWeight.from_dense(torch.randn(10, 10), (4, 4))
    with pytest.raises(ValueError, match="multiple of the block size"):
        packed.to_torch_sparse()
    with pytest.raises(TypeError, match="sparse_bsr"):
        BlockSparseWeight.from_torch_sparse(torch.randn(4, 4))
    with pytest.raises(TypeError, match="sparse_bsr"):
        BlockSparseWeight.from_torch_sparse(torch.randn(4, 4).to_sparse_csr())
    batched = torch.randn(2, 4, 4).to_sparse_bsr((2, 2))
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseWeight.from_torch_sparse(batched)


def test_density_and_nbytes():
    weight = torch.zeros(10, 12)
    weight[0, 0] = 1.0   # block (0, 0)
    weight[9, 11] = 2.0  # ragged corner block (2, 2)
    packed = BlockSparseWeight.from_dense(weight, (4, 4))
    assert packed.nnz_blocks == 2 and packed.density == pytest.approx(2 / 9)
    assert packed.nbytes == 2 * 16 * 4 + (3 + 1) * 4 + 2 * 4
    half = packed.to(torch.bfloat16)
    assert half.nbytes == 2 * 16 * 2 + (3 + 1) * 4 + 2 * 4
    assert half.crow_indices.dtype == torch.int32 and torch.equal(half.to_dense(), weight.bfloat16())
    text = repr(packed)
    assert "shape=(10, 12)" in text and "block_size=(4, 4)" in text and "density=0.222" in text


def test_to_device(device):
    packed = BlockSparseWeight.from_dense(torch.randn(9, 7), (2, 3)).to(device)
    assert packed.values.device.type == device.type
    assert packed.crow_indices.device.type == device.type and packed.col_indices.device.type == device.type


# ---- validate(): each kind of malformed part -------------------------------------------------------------------
# A valid 10 x 13 weight with 4 x 5 blocks (3 x 3 grid): blocks (0,0), (0,2), (2,1).
def valid_parts():
    return (torch.randn(3, 4, 5), torch.tensor([0, 2, 2, 3], dtype=torch.int32),
            torch.tensor([0, 2, 1], dtype=torch.int32), (10, 13))


def with_crow(crow):
    values, _, col, shape = valid_parts()
    return values, torch.tensor(crow, dtype=torch.int32), col, shape


def with_col(col):
    values, crow, _, shape = valid_parts()
    return values, crow, torch.tensor(col, dtype=torch.int32), shape


MALFORMED = {
    "crow[0] != 0": (with_crow([1, 2, 2, 3]), ValueError, r"crow_indices\[0\]"),
    "crow not monotone": (with_crow([0, 2, 1, 3]), ValueError, "non-decreasing"),
    "crow negative": (with_crow([0, -1, 2, 3]), ValueError, "crow_indices"),
    "crow[-1] < nnz": (with_crow([0, 1, 1, 2]), ValueError, r"crow_indices\[-1\]"),
    "crow[-1] > nnz": (with_crow([0, 2, 2, 4]), ValueError, r"crow_indices\[-1\]"),
    "crow too short": (with_crow([0, 2, 3]), ValueError, "crow_indices"),
    "crow too long": (with_crow([0, 2, 2, 3, 3]), ValueError, "crow_indices"),
    "col out of range": (with_col([0, 3, 1]), ValueError, r"col_indices\[1\]"),
    "col negative": (with_col([0, 2, -1]), ValueError, r"col_indices\[2\]"),
    "col unsorted": (with_col([2, 0, 1]), ValueError, "strictly increasing"),
    "col duplicate": (with_col([2, 2, 1]), ValueError, "strictly increasing"),
    "col count != blocks": (with_col([0, 2]), ValueError, "col_indices"),
    "crow int64": ((valid_parts()[0], valid_parts()[1].long(), valid_parts()[2], (10, 13)), TypeError, "crow_indices"),
    "col float": ((valid_parts()[0], valid_parts()[1], valid_parts()[2].float(), (10, 13)), TypeError, "col_indices"),
    "values int": ((torch.ones(3, 4, 5, dtype=torch.int32), *valid_parts()[1:]), TypeError, "values"),
    "values 2-D": ((torch.randn(3, 20), *valid_parts()[1:]), ValueError, "values"),
    "crow 2-D": ((valid_parts()[0], valid_parts()[1][None], *valid_parts()[2:]), ValueError, "crow_indices"),
    "values not a tensor": (([[1.0]], *valid_parts()[1:]), TypeError, "values"),
    "shape too small for col": ((*valid_parts()[:3], (10, 10)), ValueError, "col_indices"),
    "negative shape": ((*valid_parts()[:3], (-4, 13)), ValueError, "shape"),
}


def test_valid_parts_are_accepted():
    packed = BlockSparseWeight(*valid_parts())
    assert packed.nnz_blocks == 3 and packed.density == pytest.approx(3 / 9)


@pytest.mark.parametrize("name", MALFORMED)
def test_constructor_validates(name):
    parts, error, match = MALFORMED[name]
    with pytest.raises(error, match=match):
        BlockSparseWeight(*parts)


@pytest.mark.parametrize("field,index,value,match", [
    ("col_indices", 0, 7, r"col_indices\[0\]"),
    ("col_indices", 1, 0, "strictly increasing"),
    ("crow_indices", 1, 3, "crow_indices"),
    ("crow_indices", 0, -1, r"crow_indices\[0\]"),
])
def test_validate_catches_indices_corrupted_after_construction(field, index, value, match):
    packed = BlockSparseWeight(*valid_parts())
    getattr(packed, field)[index] = value
    with pytest.raises(ValueError, match=match):
        packed.validate()


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and a CUDA build of pysparse")
def test_indices_on_another_device_are_refused():
    values, crow, col, shape = valid_parts()
    with pytest.raises(ValueError, match="crow_indices"):
        BlockSparseWeight(values.cuda(), crow, col.cuda(), shape)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weight=torch.randn(4)), ValueError, "weight"),
    (dict(weight=torch.ones(4, 4, dtype=torch.int64)), TypeError, "weight"),
    (dict(weight=torch.randn(4, 4), block_size=0), ValueError, "block_size"),
    (dict(weight=torch.randn(4, 4), block_size=(2, 2, 2)), TypeError, "block_size"),
    (dict(weight=torch.randn(4, 4), block_size="4"), TypeError, "block_size"),
    (dict(weight=torch.randn(4, 4), block_size=(2.0, 2)), TypeError, "block_size"),
    (dict(weight=torch.randn(4, 4), mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "mask"),
])
def test_from_dense_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BlockSparseWeight.from_dense(**kwargs)
