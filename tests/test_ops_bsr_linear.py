"""pysparse.ops.bsr_linear (and torch.ops.pysparse.bsr_linear) against F.linear(x, masked_weight, bias) in float64."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPES, assert_matches_reference, generator_for, make_case, sample_specs
from pysparse import ops
from pysparse.formats import BlockSparseWeight

SPECS = sample_specs()


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_matches_dense_reference(spec, device):
    case = make_case(spec, device)
    out = ops.bsr_linear(*case.op_args())
    assert_matches_reference(out, case.reference(), spec.dtype, spec.id)
    # The registered op itself (int32 indices, no Python-side index check) gives the same result.
    raw = torch.ops.pysparse.bsr_linear(*case.op_args())
    assert torch.equal(raw, out)


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_reference_implementation_matches_dense(spec):
    """bsr_linear_reference is the portable fallback: it must equal the dense masked product too."""
    case = make_case(spec, "cpu")
    p = case.packed
    out = ops.bsr_linear_reference(case.x.double(), p.values.double(), p.crow_indices, p.col_indices,
                                   None if case.bias is None else case.bias.double(), case.out_features)
    torch.testing.assert_close(out, case.reference(), rtol=1e-12, atol=1e-12)


# opcheck (schema, fake kernel vs. real one, dispatch under AOT autograd) is slow-ish: one case per dtype and block
# size, with the rotating input kinds of sample_specs.
OPCHECK_SPECS = [s for s in SPECS if s.density in (0.3, 1.0)][::2]


@pytest.mark.parametrize("spec", OPCHECK_SPECS, ids=[s.id for s in OPCHECK_SPECS])
def test_opcheck(spec, device):
    case = make_case(spec, device)
    torch.library.opcheck(torch.ops.pysparse.bsr_linear.default, case.op_args())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int64_indices_are_accepted(dtype, device):
    spec = next(s for s in SPECS if s.dtype == dtype and s.density == 0.7)
    case = make_case(spec, device)
    p = case.packed
    out = ops.bsr_linear(case.x, p.values, p.crow_indices.long(), p.col_indices.long(), case.bias,
                         case.out_features)
    assert torch.equal(out, ops.bsr_linear(*case.op_args()))


@pytest.mark.parametrize("m,k,n", [(0, 9, 6), (5, 0, 6), (5, 9, 0), (0, 0, 0)], ids=["M=0", "K=0", "N=0", "all=0"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_empty_dimensions(m, k, n, with_bias, device):
    """Zero tokens, features or outputs give the shape F.linear gives (K = 0: y = bias)."""
    gen = generator_for(f"empty-{m}-{k}-{n}")
    weight = torch.randn(n, k, generator=gen).to(device)
    packed = BlockSparseWeight.from_dense(weight, (4, 4))
    bias = torch.randn(n, generator=gen).to(device) if with_bias else None
    x = torch.randn(2, m, k, generator=gen).to(device)
    out = ops.bsr_linear(x, packed.values, packed.crow_indices, packed.col_indices, bias, n)
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert_matches_reference(out, ref, torch.float32)


def test_larger_problem_splits_across_threads(device):
    """More tokens than one tile and many block rows: several work items per thread, balanced dynamically."""
    gen = generator_for("larger")
    weight = torch.randn(300, 257, generator=gen)
    keep = torch.rand(300, 257, generator=gen) > 0.5
    packed = BlockSparseWeight.from_dense(weight.to(device), (16, 16), mask=keep.to(device))
    x = torch.randn(3, 71, 257, generator=gen).to(device)
    out = ops.bsr_linear(x, packed.values, packed.crow_indices, packed.col_indices, None, 300)
    ref = F.linear(x.double(), packed.to_dense().double())
    assert_matches_reference(out, ref, torch.float32)


def test_available_backends():
    backends = ops.available_backends()
    assert backends["cpu"] in ("avx512", "avx2", "generic")
    assert isinstance(backends["cuda"], bool)
    assert backends["cuda"] == (backends["cuda_built"] and torch.cuda.is_available())

