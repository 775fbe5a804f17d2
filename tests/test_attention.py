"""CPU scaled-dot-product attention: the op ``torch.ops.pysparse.attention``, the drop-in wrapper
``pysparse.ops.scaled_dot_product_attention`` (and its fallbacks to torch's function), and the transformers glue
(``pysparse.nn.use_pysparse_attention``, ``sparsify(fast_attention=True)``).

Every result is compared with the float64 oracle ``attention_reference`` (itself checked against torch's float64
SDPA) on fresh random inputs drawn from the session seed: odd head dims, ragged and unequal sequence lengths,
grouped-query heads, transformers' strided views, bool / float masks of every broadcast shape, causal masking, and
the empty cases. Each ISA path runs in its own interpreter (this file as a script with --worker), as in
test_cpu_kernels_isa.py.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SEED, assert_matches_reference, generator_for, relative_error
from pysparse import ops

TOL = 1e-5  # float32, relative to the largest reference output (DESIGN.md "Conventions")
OP = torch.ops.pysparse.attention.default


# ---- inputs ---------------------------------------------------------------------------------------------------------
def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def make_qkv(b, h, hk, sq, skv, d, dv, layout="contiguous", gen=None):
    """q [b, h, sq, d], k [b, hk, skv, d], v [b, hk, skv, dv] in one of these memory layouts:
    contiguous; transformers ([B, S, H, D] transposed to [B, H, S, D]: heads and tokens strided, unit last dim);
    sliced (a D-wide window of wider rows: unit last stride, row stride > D, unaligned start); lastdim (the head dim
    is not the unit-stride dim: the op copies); expanded (batch broadcast, stride 0)."""
    gen = gen or torch.Generator().manual_seed(SEED)

    def one(heads, seq, dim):
        if layout == "contiguous":
            return _randn(gen, b, heads, seq, dim)
        if layout == "transformers":
            return _randn(gen, b, seq, heads, dim).transpose(1, 2)
        if layout == "sliced":
            return _randn(gen, b, heads, seq, dim + 3)[..., 1:dim + 1]
        if layout == "lastdim":
            return _randn(gen, b, heads, dim, seq).transpose(2, 3)
        if layout == "expanded":
            return _randn(gen, 1, heads, seq, dim).expand(b, heads, seq, dim)
        raise ValueError(layout)

    return one(h, sq, d), one(hk, skv, d), one(hk, skv, dv)


MASK_SHAPES = ["B1QK", "QK", "111K", "BHQK", "expanded", "transposed"]


def make_mask(kind, shape, b, h, sq, skv, gen):
    """A bool (True = attend) or float (random values and -inf entries) mask of a shape broadcasting to
    [b, h, sq, skv]: "B1QK", "QK", "111K", "BHQK", "expanded" (a [b, 1, 1, skv] mask expanded: stride-0 dims) or
    "transposed" (a [b, h, sq, skv] view whose key dim is not the unit-stride dim)."""
    base = {"B1QK": (b, 1, sq, skv), "QK": (sq, skv), "111K": (1, 1, 1, skv), "BHQK": (b, h, sq, skv),
            "expanded": (b, 1, 1, skv), "transposed": (b, h, skv, sq)}[shape]
    keep = torch.rand(*base, generator=gen) > 0.3
    if kind == "bool":
        m = keep
    else:
        m = torch.where(keep, 2 * torch.randn(*base, generator=gen), torch.tensor(float("-inf")))
    if shape == "expanded":
        m = m.expand(b, h, sq, skv)
        assert m.numel() == 0 or all(m.stride(i) == 0 or m.shape[i] == 1 for i in (1, 2))
    if shape == "transposed":
        m = m.transpose(2, 3)
        assert m.stride(-1) != 1 or m.numel() == 0 or sq <= 1
    return m


def reference(q, k, v, mask=None, causal=False, scale=None):
    """attention_reference in float64 from the (float32) inputs: [B, Sq, H, Dv]."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return ops.attention_reference(q.double(), k.double(), v.double(), mask, causal, scale)


def check_op(q, k, v, mask=None, causal=False, scale=None, what=""):
    """Runs the op and checks it: [B, Sq, H, Dv] contiguous float32, finite, within TOL of the reference."""
    out = OP(q, k, v, mask, causal, scale)
    ref = reference(q, k, v, mask, causal, scale)
    b, h, sq, _ = q.shape
    assert tuple(out.shape) == (b, sq, h, v.shape[-1]), what
    assert out.is_contiguous(), f"{what}: output strides {out.stride()}"
    assert_matches_reference(out, ref, torch.float32, what)
    return out, ref


def kernel_calls(fn) -> tuple[int, object]:
    """How many times fn() runs pysparse::attention (from the profiler's events), and its result."""
    with torch.autograd.profiler.profile() as prof:
        result = fn()
    return sum(e.count for e in prof.key_averages() if e.key == "pysparse::attention"), result


# (B, H, Hk, Sq, Skv, D, Dv): odd head dims, lengths not multiples of 16 (nor of the kernel's 6-row tiles),
# Skv != Sq, Sq = 1, Skv = 1, grouped-query (H / Hk = 3 and 2) and multi-query (Hk = 1) heads, one MiniLM-size case.
SHAPES = [
    (2, 4, 4, 7, 13, 5, 11),
    (1, 6, 2, 1, 33, 9, 3),
    (3, 6, 3, 17, 1, 24, 40),
    (2, 3, 3, 19, 19, 64, 64),
    (1, 2, 2, 40, 37, 1, 1),
    (2, 2, 1, 6, 50, 17, 33),
    (1, 4, 4, 23, 16, 8, 16),
    (2, 12, 12, 128, 128, 32, 32),  # MiniLM-L6: 12 heads of 32, 128 tokens
]
LAYOUTS = ["contiguous", "transformers", "sliced", "lastdim", "expanded"]


def _shape_id(s):
    return "B{}H{}Hk{}-Sq{}Skv{}-D{}Dv{}".format(*s)


def _case_gen(*parts) -> torch.Generator:
    return generator_for("attention-" + "-".join(map(str, parts)))


# ---- the op against the reference -----------------------------------------------------------------------------------
def test_reference_matches_torch_sdpa():
    """The oracle itself: torch's float64 SDPA (math) on the same inputs, masks and causal flags."""
    gen = _case_gen("oracle")
    for b, h, hk, sq, skv, d, dv in [(2, 4, 4, 7, 13, 5, 11), (1, 6, 2, 9, 9, 8, 3)]:
        q, k, v = (t.double() for t in make_qkv(b, h, hk, sq, skv, d, dv, gen=gen))
        mask = make_mask("float", "B1QK", b, h, sq, skv, gen).double()
        mask[..., 0] = 0.0  # every row sees key 0: torch's reference rows are defined
        for kw in (dict(), dict(attn_mask=mask), dict(attn_mask=mask > -1), dict(is_causal=True), dict(scale=0.3)):
            ours = ops.attention_reference(q, k, v, kw.get("attn_mask"), kw.get("is_causal", False),
                                           kw.get("scale"))
            theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=h != hk, **kw).transpose(1, 2)
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, msg=str(kw))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_op_matches_reference(shape, causal):
    """No mask, each memory layout in turn (transformers' strided views among them)."""
    i = SHAPES.index(shape)
    gen = _case_gen(shape, causal)
    for layout in (LAYOUTS[i % len(LAYOUTS)], "transformers"):
        q, k, v = make_qkv(*shape, layout=layout, gen=gen)
        check_op(q, k, v, causal=causal, what=f"{_shape_id(shape)} {layout} causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_op_with_mask_matches_reference(shape, kind, causal):
    """bool / float (with -inf) masks of every broadcast shape; with is_causal both apply."""
    i = SHAPES.index(shape)
    b, h, _, sq, skv, _, _ = shape
    gen = _case_gen(shape, kind, causal)
    q, k, v = make_qkv(*shape, layout=LAYOUTS[(i + 1) % len(LAYOUTS)], gen=gen)
    for j in range(2):
        mshape = MASK_SHAPES[(2 * i + j) % len(MASK_SHAPES)]
        mask = make_mask(kind, mshape, b, h, sq, skv, gen)
        out, ref = check_op(q, k, v, mask, causal, what=f"{_shape_id(shape)} {kind} mask {mshape} causal={causal}")
        if kind == "bool" and not causal and mshape in ("QK", "BHQK"):  # the mask does something
            if not bool(mask.all()):
                assert relative_error(out, reference(q, k, v, None, causal)) > 1e-3


@pytest.mark.parametrize("mshape", MASK_SHAPES)
def test_every_mask_shape_and_kind(mshape):
    """Each broadcast shape with both kinds, against the reference and against torch's float32 SDPA."""
    b, h, sq, skv = 2, 3, 11, 21
    gen = _case_gen("mask", mshape)
    q, k, v = make_qkv(b, h, h, sq, skv, 12, 7, layout="transformers", gen=gen)
    for kind in ("bool", "float"):
        mask = make_mask(kind, mshape, b, h, sq, skv, gen)
        out, _ = check_op(q, k, v, mask, what=f"{kind} {mshape}")
        torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        assert relative_error(out, torch_out.double()) < TOL


def test_float_mask_values_are_added():
    """A float mask is added to the scaled scores: a mask that is constant along the keys changes nothing, a large
    bias on one key selects that key's value."""
    gen = _case_gen("additive")
    q, k, v = make_qkv(1, 2, 2, 5, 9, 8, 6, gen=gen)
    plain = OP(q, k, v, None, False, None)
    shifted = OP(q, k, v, torch.full((5, 1), 7.5), False, None)
    assert relative_error(shifted, plain.double()) < TOL
    bias = torch.zeros(5, 9)
    bias[:, 4] = 200.0
    picked = OP(q, k, v, bias, False, None)
    expect = v[0, :, 4].unsqueeze(0).expand(5, 2, 6)  # [Sq, H, Dv]
    assert relative_error(picked[0], expect.double()) < TOL


def test_fully_masked_rows_give_zeros():
    """A query row that sees no key gives zeros (bool False everywhere, float -inf everywhere); torch gives zeros too,
    and the wrapper equals torch there."""
    b, h, sq, skv = 2, 3, 7, 10
    gen = _case_gen("fully-masked")
    q, k, v = make_qkv(b, h, h, sq, skv, 9, 5, layout="transformers", gen=gen)
    keep = torch.rand(b, 1, sq, skv, generator=gen) > 0.2
    keep[..., 0] = True
    keep[0, :, 2] = False  # row 2 of batch 0 sees nothing
    keep[1, :, 5] = False
    fmask = torch.where(keep, torch.randn(b, 1, sq, skv, generator=gen), torch.tensor(float("-inf")))
    for mask in (keep, fmask):
        out, _ = check_op(q, k, v, mask, what=f"fully masked rows, {mask.dtype}")
        assert bool((out[0, 2] == 0).all()) and bool((out[1, 5] == 0).all())
        assert bool((out[0, 3].abs() > 0).any())  # the other rows are not zeroed
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert bool((theirs[0, :, 2] == 0).all()) and bool((theirs[1, :, 5] == 0).all())
        ours = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert ours.shape == theirs.shape
        assert relative_error(ours, theirs.double()) < TOL
        assert torch.equal(ours[0, :, 2], theirs[0, :, 2])
    # A causal row sees at least key 0; with a mask that drops key 0, row 0 sees nothing.
    drop0 = torch.ones(sq, skv, dtype=torch.bool)
    drop0[:, 0] = False
    out, _ = check_op(q, k, v, drop0, True, what="causal + mask dropping key 0")
    assert bool((out[:, 0] == 0).all()) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("sq, skv", [(5, 12), (12, 5), (1, 9), (9, 1), (17, 17)])
def test_causal_is_upper_left(sq, skv):
    """is_causal: query i sees keys j <= i (torch's convention) whether Skv is longer or shorter than Sq; equals an
    explicit tril mask, torch's is_causal and the reference."""
    gen = _case_gen("causal", sq, skv)
    q, k, v = make_qkv(2, 4, 2, sq, skv, 10, 6, layout="transformers", gen=gen)
    out, _ = check_op(q, k, v, None, True, what=f"causal Sq={sq} Skv={skv}")
    tril = torch.ones(sq, skv, dtype=torch.bool).tril()
    assert relative_error(out, reference(q, k, v, tril)) < TOL
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert relative_error(out, theirs.double()) < TOL
    if skv > 1 and sq > 1:
        assert relative_error(out, reference(q, k, v)) > 1e-3  # causal changes the result


@pytest.mark.parametrize("h, hk", [(6, 2), (6, 3), (6, 1), (4, 4)])
def test_grouped_query_heads(h, hk):
    """Query head j reads key/value head j // (H / Hk): equals the reference, torch's enable_gqa SDPA, and the
    attention over explicitly repeated key/value heads."""
    gen = _case_gen("gqa", h, hk)
    q, k, v = make_qkv(2, h, hk, 13, 22, 12, 20, layout="transformers", gen=gen)
    mask = make_mask("bool", "B1QK", 2, h, 13, 22, gen)
    for m in (None, mask):
        out, _ = check_op(q, k, v, m, what=f"gqa {h}/{hk}")
        rep = h // hk
        expanded = OP(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), m, False, None)
        assert relative_error(out, expanded.double()) < TOL
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        assert relative_error(out, theirs.transpose(1, 2).double()) < TOL
        wrapped = ops.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        assert relative_error(wrapped, theirs.double()) < TOL
    if 1 < hk < h:  # a wrong head mapping (e.g. j % Hk) would give another result
        wrong = OP(q, k.repeat(1, h // hk, 1, 1), v.repeat(1, h // hk, 1, 1), None, False, None)
        assert relative_error(wrong, reference(q, k, v)) > 1e-3


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5, -0.7, 0.0])
def test_explicit_scale(scale):
    gen = _case_gen("scale", scale)
    q, k, v = make_qkv(2, 3, 3, 9, 14, 16, 8, gen=gen)
    out, _ = check_op(q, k, v, None, False, scale, what=f"scale={scale}")
    theirs = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    assert relative_error(out, theirs.double()) < TOL
    # The default is 1/sqrt(D): the same as passing it, and not the same as another scale.
    default = OP(q, k, v, None, False, None)
    assert relative_error(default, OP(q, k, v, None, False, 16 ** -0.5).double()) < TOL
    if scale != 0.25:
        assert relative_error(default, out.double()) > 1e-4


EMPTY_SHAPES = [(2, 3, 3, 5, 0, 8, 6), (2, 6, 2, 4, 0, 5, 7), (0, 2, 2, 5, 5, 8, 8), (2, 2, 2, 0, 5, 8, 8),
                (2, 2, 2, 3, 5, 4, 0), (2, 2, 1, 3, 0, 4, 3)]


@pytest.mark.parametrize("causal", [False, True])
def test_empty_sizes(causal):
    """Skv = 0 gives zeros of the right shape (as torch's SDPA); batch 0, Sq 0 and Dv 0 give empty outputs."""
    gen = _case_gen("empty", causal)
    for shape in EMPTY_SHAPES:
        b, h, hk, sq, skv, d, dv = shape
        q, k, v = make_qkv(*shape, gen=gen)
        out = OP(q, k, v, None, causal, None)
        assert tuple(out.shape) == (b, sq, h, dv), shape
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert bool((out == 0).all()), f"{shape}: Skv = 0 must give zeros"
        wrapped = ops.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h != hk)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h != hk)
        assert wrapped.shape == theirs.shape == (b, h, sq, dv) and torch.equal(wrapped, theirs), shape
    # A zero head dim: every score is 0, so each row is the mean of the values (torch's result too).
    q, k, v = torch.empty(2, 2, 3, 0), torch.empty(2, 2, 5, 0), torch.randn(2, 2, 5, 4, generator=gen)
    out = OP(q, k, v, None, False, None)
    assert relative_error(out, v.double().mean(2, keepdim=True).expand(2, 2, 3, 4).transpose(1, 2)) < TOL
    assert relative_error(out, ops.attention_reference(q, k, v)) < TOL


@pytest.mark.parametrize("shape", [s for s in EMPTY_SHAPES if 0 in s[:5]], ids=_shape_id)
def test_empty_sizes_with_mask(shape):
    b, h, hk, sq, skv, d, dv = shape
    q, k, v = make_qkv(*shape, gen=_case_gen("empty-mask", shape))
    for mask in (torch.ones(sq, skv, dtype=torch.bool), torch.zeros(b, 1, sq, skv)):
        out = OP(q, k, v, mask, False, None)
        assert tuple(out.shape) == (b, sq, h, dv) and bool((out == 0).all())
        wrapped = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h != hk)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h != hk)
        assert wrapped.shape == theirs.shape and torch.equal(wrapped, theirs)


def test_single_key_and_single_query():
    """Skv = 1: every row equals that key's value (softmax of one score is 1), masked-out: zeros. Sq = 1 decoding."""
    gen = _case_gen("single")
    q, k, v = make_qkv(2, 4, 2, 6, 1, 9, 5, layout="transformers", gen=gen)
    out, _ = check_op(q, k, v)
    expect = v.repeat_interleave(2, 1).expand(2, 4, 6, 5).transpose(1, 2)
    assert relative_error(out, expect.double()) < TOL
    out_masked = OP(q, k, v, torch.tensor([False]), False, None)
    assert bool((out_masked == 0).all())
    q1, k1, v1 = make_qkv(3, 4, 4, 1, 29, 13, 6, layout="transformers", gen=gen)
    for causal in (False, True):  # one query with causal: sees only key 0
        out1, _ = check_op(q1, k1, v1, None, causal, what=f"Sq=1 causal={causal}")
    assert relative_error(out1[:, 0], v1[:, :, 0].double()) < TOL


def test_large_scores_are_stable():
    """Scores in the hundreds to thousands (exp overflows unless softmax subtracts the row maximum): finite and equal
    to the reference. Integer q and k keep every score exact in float32, so the check is of the softmax alone."""
    gen = _case_gen("large")
    q = torch.randint(-12, 13, (2, 3, 9, 16), generator=gen).float()
    k = torch.randint(-12, 13, (2, 3, 40, 16), generator=gen).float()
    v = torch.randn(2, 3, 40, 8, generator=gen)
    for scale in (1.0, 0.5, -2.0):
        out, _ = check_op(q, k, v, None, False, scale, what=f"large scores, scale {scale}")
        check_op(q, k, v, None, True, scale, what=f"large scores, causal, scale {scale}")
    assert float((q @ k.transpose(-1, -2)).abs().max()) > 300  # exp would overflow float32 without the max


# ---- threads --------------------------------------------------------------------------------------------------------
def test_thread_count_does_not_change_results():
    """torch.set_num_threads(1) and (2) give the same output (each query row is computed the same way whatever
    the split); both match the reference."""
    gen = _case_gen("threads")
    cases = [make_qkv(2, 12, 12, 128, 128, 32, 32, layout="transformers", gen=gen),
             make_qkv(1, 2, 1, 37, 29, 11, 9, gen=gen),   # fewer (batch, head) pairs than 4 per thread: row chunks
             make_qkv(1, 1, 1, 100, 61, 8, 8, gen=gen)]
    before = torch.get_num_threads()
    try:
        for q, k, v in cases:
            outs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                for causal in (False, True):
                    outs.append(OP(q, k, v, None, causal, None))
            assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3]), tuple(q.shape)
            assert relative_error(outs[1], reference(q, k, v, None, True)) < TOL
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before


def test_concurrent_callers():
    """Four Python threads calling the op at once (per-call scratch buffers are not shared)."""
    gen = _case_gen("concurrent")
    shapes = [(2, 4, 4, 33, 33, 16, 16), (1, 6, 2, 7, 50, 24, 8), (3, 2, 2, 64, 17, 5, 11), (1, 12, 12, 20, 90, 32, 32)]
    inputs = [make_qkv(*s, layout="transformers", gen=gen) for s in shapes]
    masks = [make_mask("bool", "B1QK", s[0], s[1], s[3], s[4], gen) for s in shapes]
    refs = [reference(q, k, v, m, i % 2 == 1) for i, ((q, k, v), m) in enumerate(zip(inputs, masks))]
    errors: list[str] = []

    def caller(i):
        try:
            q, k, v = inputs[i]
            for _ in range(8):
                out = OP(q, k, v, masks[i], i % 2 == 1, None)
                err = relative_error(out, refs[i])
                if not err < TOL or not bool(torch.isfinite(out).all()):
                    errors.append(f"caller {i}: relative error {err:.3g}")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"caller {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "\n".join(errors)


# ---- bad input to the op --------------------------------------------------------------------------------------------
def _valid():
    gen = _case_gen("bad")
    q, k, v = make_qkv(1, 4, 2, 3, 5, 8, 6, gen=gen)
    return dict(query=q, key=k, value=v, attn_mask=None, is_causal=False, scale=None)


BAD = {
    "query 3-D": ({"query": lambda a: a["query"][0]}, ValueError, r"query must be 4-D"),
    "key 5-D": ({"key": lambda a: a["key"][None]}, ValueError, r"key must be 4-D"),
    "value 3-D": ({"value": lambda a: a["value"][0]}, ValueError, r"value must be 4-D"),
    "key batch": ({"key": lambda a: torch.randn(2, 2, 5, 8)}, ValueError, r"key and value must have the query's batch"),
    "value batch": ({"value": lambda a: torch.randn(3, 2, 5, 6)}, ValueError, r"batch"),
    "value heads": ({"value": lambda a: torch.randn(1, 1, 5, 6)}, ValueError, r"value must have key's heads"),
    "value length": ({"value": lambda a: torch.randn(1, 2, 4, 6)}, ValueError, r"value must have key's heads"),
    "key head dim": ({"key": lambda a: torch.randn(1, 2, 5, 7)}, ValueError, r"key's head dim"),
    "heads not a multiple": ({"key": lambda a: torch.randn(1, 3, 5, 8), "value": lambda a: torch.randn(1, 3, 5, 6)},
                             ValueError, r"heads \(4\) must be a multiple of key/value's heads, got 3"),
    "zero kv heads": ({"key": lambda a: torch.randn(1, 0, 5, 8), "value": lambda a: torch.randn(1, 0, 5, 6)},
                      ValueError, r"heads"),
    "query float64": ({"query": lambda a: a["query"].double()}, TypeError, r"query must be float32"),
    "key float64": ({"key": lambda a: a["key"].double()}, TypeError, r"key must be float32"),
    "value bfloat16": ({"value": lambda a: a["value"].bfloat16()}, TypeError, r"value must be float32"),
    "int mask": ({"attn_mask": lambda a: torch.ones(3, 5, dtype=torch.int32)}, TypeError, r"attn_mask must be bool"),
    "float64 mask": ({"attn_mask": lambda a: torch.zeros(3, 5, dtype=torch.float64)}, TypeError, r"attn_mask"),
    "mask Sq": ({"attn_mask": lambda a: torch.ones(4, 5, dtype=torch.bool)}, ValueError,
                r"attn_mask must broadcast to \[1, 4, 3, 5\], got shape \[4, 5\]"),
    "mask Skv": ({"attn_mask": lambda a: torch.zeros(1, 1, 3, 6)}, ValueError, r"attn_mask must broadcast"),
    "mask heads": ({"attn_mask": lambda a: torch.ones(1, 2, 3, 5, dtype=torch.bool)}, ValueError,
                   r"attn_mask must broadcast"),
    "mask 5-D": ({"attn_mask": lambda a: torch.ones(1, 1, 1, 3, 5, dtype=torch.bool)}, ValueError, r"attn_mask"),
    "scale inf": ({"scale": float("inf")}, ValueError, r"scale must be finite"),
    "scale nan": ({"scale": float("nan")}, ValueError, r"scale must be finite"),
    "scale -inf": ({"scale": float("-inf")}, ValueError, r"scale must be finite"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_op_refuses_bad_input(name):
    change, error, match = BAD[name]
    args = _valid()
    OP(*args.values())  # the unchanged call is fine
    for arg, value in change.items():
        args[arg] = value(args) if callable(value) else value
    with pytest.raises(error, match=match):
        OP(*args.values())


def test_op_refuses_operands_not_on_the_cpu():
    """The CPU kernel reads CPU tensors only (called through the CPU key: a plain call with a meta tensor would run
    the fake kernel)."""
    args = _valid()
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    for name in ("query", "key", "value", "attn_mask"):
        bad = dict(args, attn_mask=torch.ones(3, 5, dtype=torch.bool))
        bad[name] = bad[name].to("meta")
        with pytest.raises(ValueError, match=f"{name} must be on the CPU, got meta"):
            OP.redispatch(cpu, *bad.values())


# ---- the drop-in wrapper --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_wrapper_matches_torch_and_runs_the_kernel(layout):
    gen = _case_gen("wrapper", layout)
    q, k, v = make_qkv(2, 6, 3, 11, 19, 20, 12, layout=layout, gen=gen)
    for kw in (dict(), dict(is_causal=True), dict(attn_mask=make_mask("bool", "B1QK", 2, 6, 11, 19, gen)),
               dict(attn_mask=make_mask("float", "QK", 2, 6, 11, 19, gen), scale=0.2)):
        assert ops.attention_kernel_applies(q, k, v, kw.get("attn_mask"), 0.0, kw.get("is_causal", False), True)
        calls, ours = kernel_calls(lambda: ops.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw))
        assert calls == 1, f"{layout} {list(kw)}: the kernel ran {calls} times"
        theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        assert ours.shape == theirs.shape == (2, 6, 11, 12) and ours.dtype == torch.float32
        assert bool(torch.isfinite(ours).all())
        assert relative_error(ours, theirs.double()) < TOL
        ref = reference(q, k, v, kw.get("attn_mask"), kw.get("is_causal", False), kw.get("scale"))
        assert relative_error(ours, ref.transpose(1, 2)) < TOL
        # [B, H, Sq, Dv] as a view of the op's [B, Sq, H, Dv]: what transformers does next copies nothing.
        assert ours.transpose(1, 2).is_contiguous()


def test_wrapper_under_no_grad_and_inference_mode_uses_the_kernel():
    gen = _case_gen("modes")
    q, k, v = make_qkv(1, 2, 2, 5, 8, 4, 4, gen=gen)
    qg = q.clone().requires_grad_()
    with torch.no_grad():
        calls, _ = kernel_calls(lambda: ops.scaled_dot_product_attention(qg, k, v))
    assert calls == 1
    with torch.inference_mode():
        calls, out = kernel_calls(lambda: ops.scaled_dot_product_attention(q, k, v))
    assert calls == 1 and relative_error(out, reference(q, k, v).transpose(1, 2)) < TOL


def test_kernel_applies_truth_table():
    gen = _case_gen("applies")
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8, 8, gen=gen)
    m = torch.ones(5, 7, dtype=torch.bool)
    yes = ops.attention_kernel_applies
    assert yes(q, k, v, enable_gqa=True) and yes(q, k, v, m, enable_gqa=True)
    assert yes(q, k, v, m.float(), enable_gqa=True) and yes(q, k, v, None, 0.0, True, True)
    assert not yes(q, k, v)                                   # different heads without enable_gqa
    assert not yes(q, k, v, m, 0.0, True, True)               # mask together with is_causal: torch raises
    assert not yes(q, k, v, None, 0.1, False, True)           # dropout
    assert not yes(q.double(), k.double(), v.double(), enable_gqa=True)
    assert not yes(q.bfloat16(), k.bfloat16(), v.bfloat16(), enable_gqa=True)
    assert not yes(q[0], k[0], v[0], enable_gqa=True)         # 3-D
    assert not yes(q, k, v, m.int(), enable_gqa=True)          # int mask: torch's error
    assert not yes(q, k, v, m.double(), enable_gqa=True)
    assert not yes(q.requires_grad_(), k, v, enable_gqa=True)  # a gradient is wanted
    with torch.no_grad():
        assert yes(q, k, v, enable_gqa=True)
    q.requires_grad_(False)
    assert not yes(q, k, v, m.float().requires_grad_(), enable_gqa=True)
    assert not yes(q, k[:1], v[:1], enable_gqa=True)          # batch mismatch (torch broadcasts or raises)
    assert not yes(q, k, v[..., :6, :], enable_gqa=True)      # value length differs from key's
    assert not yes(q, k[..., :6], v, enable_gqa=True)         # head dim differs


def test_wrapper_dropout_falls_back_to_torch():
    """dropout_p > 0 is torch's (its RNG): same seed, same result as F.scaled_dot_product_attention; no kernel."""
    gen = _case_gen("dropout")
    q, k, v = make_qkv(2, 3, 3, 9, 12, 8, 8, gen=gen)
    torch.manual_seed(123)
    calls, ours = kernel_calls(lambda: ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    torch.manual_seed(123)
    theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert calls == 0
    assert ours.shape == (2, 3, 9, 8) and bool(torch.isfinite(ours).all())
    assert torch.equal(ours, theirs)
    assert relative_error(ours, reference(q, k, v).transpose(1, 2)) > 1e-3  # dropout did something


def test_wrapper_gradients_flow_like_torch():
    """Inputs that require grad go to torch's function: backward works and gives torch's gradients."""
    gen = _case_gen("grad")
    base = make_qkv(2, 6, 2, 7, 10, 8, 5, gen=gen)
    mask = make_mask("float", "B1QK", 2, 6, 7, 10, gen)
    mask[..., 0] = 0.0
    grads = []
    for fn in (ops.scaled_dot_product_attention, F.scaled_dot_product_attention):
        q, k, v = (t.detach().clone().requires_grad_() for t in base)
        calls, out = kernel_calls(lambda: fn(q, k, v, attn_mask=mask, enable_gqa=True))
        if fn is ops.scaled_dot_product_attention:
            assert calls == 0
        assert out.requires_grad
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        grads.append((out.detach(), q.grad, k.grad, v.grad))
    for ours, theirs in zip(*grads):
        assert ours is not None and theirs is not None
        assert bool(torch.isfinite(ours).all()) and float(ours.abs().max()) > 0
        assert relative_error(ours, theirs.double()) < TOL


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_wrapper_other_dtypes_fall_back_to_torch(dtype):
    gen = _case_gen("dtype", dtype)
    q, k, v = (t.to(dtype) for t in make_qkv(2, 4, 4, 6, 9, 8, 8, gen=gen))
    mask = torch.rand(6, 9, generator=gen) > 0.3
    calls, ours = kernel_calls(lambda: ops.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert calls == 0 and ours.dtype == dtype
    assert torch.equal(ours, theirs)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    assert relative_error(ours, reference(q, k, v, mask).transpose(1, 2)) < tol


def test_wrapper_3d_inputs_fall_back_to_torch():
    gen = _case_gen("3d")
    q, k, v = (t[0] for t in make_qkv(1, 3, 3, 6, 9, 8, 5, gen=gen))  # [N, S, E]
    calls, ours = kernel_calls(lambda: ops.scaled_dot_product_attention(q, k, v, is_causal=True))
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert calls == 0 and ours.shape == (3, 6, 5)
    assert torch.equal(ours, theirs)


def test_wrapper_mask_with_is_causal_raises_like_torch():
    gen = _case_gen("causal+mask")
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, 8, gen=gen)
    mask = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    with pytest.raises(Exception) as ours:
        ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def test_wrapper_mismatched_heads_raise_like_torch():
    """Different head counts without enable_gqa: torch's error (the wrapper does not take them silently)."""
    gen = _case_gen("heads")
    q, k, v = make_qkv(1, 6, 2, 4, 5, 8, 8, gen=gen)
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(Exception) as ours:
        ops.scaled_dot_product_attention(q, k, v)
    assert type(ours.value) is type(theirs.value)


def test_wrapper_mask_that_does_not_broadcast_raises():
    """A drop-in raises what torch raises (the wrapper leaves such a mask to torch); the op itself raises
    ValueError naming attn_mask (the project's convention, tested with the other bad inputs)."""
    gen = _case_gen("bad mask")
    q, k, v = make_qkv(1, 2, 2, 3, 5, 8, 8, gen=gen)
    bad = torch.ones(4, 5, dtype=torch.bool)
    assert not ops.attention_kernel_applies(q, k, v, bad)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=bad)
    with pytest.raises(RuntimeError):
        ops.scaled_dot_product_attention(q, k, v, attn_mask=bad)


# ---- torch.library / torch.compile ----------------------------------------------------------------------------------
def _opcheck_samples():
    gen = _case_gen("opcheck")
    q, k, v = make_qkv(2, 3, 3, 5, 7, 8, 6, layout="transformers", gen=gen)
    qg, kg, vg = make_qkv(1, 6, 2, 9, 4, 5, 3, layout="sliced", gen=gen)
    return {
        "plain": (q, k, v, None, False, None),
        "bool-mask-causal-scale": (q, k, v, make_mask("bool", "B1QK", 2, 3, 5, 7, gen), True, 0.3),
        "float-mask-gqa": (qg, kg, vg, make_mask("float", "QK", 1, 6, 9, 4, gen), False, None),
        "empty-kv": (q, k[:, :, :0], v[:, :, :0], None, True, None),
    }


@pytest.mark.parametrize("sample", list(_opcheck_samples()))
def test_opcheck(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                                 "test_aot_dispatch_dynamic"))


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 6, 5, 8), torch.empty(2, 3, 9, 8), torch.empty(2, 3, 9, 7)
        out = OP(q, k, v, None, False, None)
    assert tuple(out.shape) == (2, 5, 6, 7) and out.dtype == torch.float32


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a function calling the wrapper: one graph, the op inside it, eager's result."""
    from torch._dynamo.testing import CompileCounter

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v, m):
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1) * 2.0

    gen = _case_gen("compile")
    q, k, v = make_qkv(2, 4, 2, 7, 11, 8, 8, layout="transformers", gen=gen)
    m = make_mask("float", "B1QK", 2, 4, 7, 11, gen)
    torch._dynamo.reset()
    counter = CompileCounter()
    with torch.no_grad():
        eager = f(q, k, v, m)
        compiled = torch.compile(f, backend=counter, fullgraph=True)(q, k, v, m)
        assert counter.frame_count == 1
        assert relative_error(compiled, eager.double()) < 1e-6
        traced = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, m)
        assert relative_error(traced, eager.double()) < 1e-6
        inductor = torch.compile(f, fullgraph=True)(q, k, v, m)
        assert relative_error(inductor, eager.double()) < 1e-6
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any(t is OP or t is torch.ops.pysparse.attention for t in targets), targets
    torch._dynamo.reset()


# ---- every ISA path (one interpreter each) --------------------------------------------------------------------------
def _run_worker(isa: str) -> dict:
    import pysparse

    root = os.path.dirname(os.path.dirname(os.path.abspath(pysparse.__file__)))
    env = dict(os.environ, PYSPARSE_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(SEED)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_isa_path_matches_reference(isa):
    if isa != "generic" and ops.available_backends()["cpu"] == "generic":
        pytest.skip("this CPU runs only the generic path")
    report = _run_worker(isa)
    if report["isa"] != isa:  # the library fell back: this CPU lacks the path
        pytest.skip(f"this CPU cannot run the {isa} path (got {report['isa']})")
    assert report["checked"] >= 40
    assert not report["failures"], "\n".join(report["failures"][:20])


def _worker(seed: int) -> None:
    isa = ops.available_backends()["cpu"]
    if isa != os.environ.get("PYSPARSE_CPU_ISA"):
        print(json.dumps({"isa": isa, "checked": 0, "failures": []}))
        return
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(isa.encode()))
    failures, checked = [], 0
    shapes = SHAPES[:-1] + [(1, 3, 3, 64, 64, 32, 32), (2, 2, 2, 5, 0, 8, 4), (1, 4, 2, 13, 31, 40, 24)]
    for i, shape in enumerate(shapes):
        b, h, _, sq, skv, _, _ = shape
        q, k, v = make_qkv(*shape, layout=LAYOUTS[i % len(LAYOUTS)], gen=gen)
        for j, (kind, causal) in enumerate([(None, False), (None, True), ("bool", False), ("float", True),
                                            ("bool", True), ("float", False)]):
            if skv == 0 and kind is not None:  # see test_empty_sizes_with_mask (an empty mask is refused)
                continue
            mask = None if kind is None else make_mask(kind, MASK_SHAPES[(i + j) % len(MASK_SHAPES)], b, h, sq, skv,
                                                       gen)
            out = OP(q, k, v, mask, causal, None)
            ref = reference(q, k, v, mask, causal)
            err = relative_error(out, ref)
            checked += 1
            if not (out.shape == ref.shape and bool(torch.isfinite(out).all()) and err < TOL):
                failures.append(f"{isa} {shape} mask={kind} causal={causal}: rel err {err:.3g}, "
                                f"shape {tuple(out.shape)}, finite={bool(torch.isfinite(out).all())}")
    print(json.dumps({"isa": isa, "checked": checked, "failures": failures}))


# ---- transformers ---------------------------------------------------------------------------------------------------
def _bert(attn_implementation="sdpa", **overrides):
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    kw.update(overrides)
    config = transformers.BertConfig(**kw)  # a config per model: _from_config sets its _attn_implementation
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(config, attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    return model.eval()


def _bert_inputs():
    gen = _case_gen("bert")
    ids = torch.randint(0, 100, (3, 13), generator=gen)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0   # padding
    mask[2, 4:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def test_use_pysparse_attention_on_bert():
    from pysparse.nn import use_pysparse_attention

    sdpa = _bert()
    model = copy.deepcopy(sdpa)
    said = use_pysparse_attention(model)
    assert isinstance(said, str) and "pysparse" in said and "unchanged" not in said
    assert model.config._attn_implementation == "pysparse_sdpa"
    assert sdpa.config._attn_implementation == "sdpa"
    inputs = _bert_inputs()
    with torch.no_grad():
        expect = sdpa(**inputs).last_hidden_state
        calls, got = kernel_calls(lambda: model(**inputs).last_hidden_state)
    assert calls == 2, f"pysparse::attention ran {calls} times for 2 layers"
    assert got.shape == expect.shape == (3, 13, 64)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    with torch.no_grad():  # padding matters: the padded rows' keys are really masked out
        unpadded = model(input_ids=inputs["input_ids"]).last_hidden_state
    assert float((unpadded[2] - got[2]).abs().max()) > 1e-3
    # Twice is fine: says so, and still computes the same.
    again = use_pysparse_attention(model)
    assert isinstance(again, str) and "unchanged" not in again
    assert model.config._attn_implementation == "pysparse_sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, expect, rtol=0, atol=1e-5)


def _sdpa_and_switched(sdpa):
    """``sdpa`` and a copy of it switched to pysparse's attention."""
    from pysparse.nn import use_pysparse_attention

    model = copy.deepcopy(sdpa)
    use_pysparse_attention(model)
    return sdpa, model


def _same_draws_without_kernel(sdpa, model, inputs, seed):
    """Both models' last hidden states under the same random draws: the switched model must not have run the
    kernel (it fell back to SDPA) and must give the sdpa model's result."""
    torch.manual_seed(seed)
    expect = sdpa(**inputs).last_hidden_state
    torch.manual_seed(seed)
    calls, got = kernel_calls(lambda: model(**inputs).last_hidden_state)
    assert calls == 0
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    return expect, got


def test_bert_training_falls_back_to_sdpa():
    """With gradients (train mode) transformers' SDPA runs: same outputs and gradients as the sdpa model under the
    same seed (attention dropout off so that the only dropout is the hidden one, drawn the same way)."""
    sdpa, model = _sdpa_and_switched(_bert(attention_probs_dropout_prob=0.0).train())
    inputs = _bert_inputs()
    expect, got = _same_draws_without_kernel(sdpa, model, inputs, seed=7)
    expect.square().sum().backward()
    got.square().sum().backward()
    for (name, p_ref), (_, p) in zip(sdpa.named_parameters(), model.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)
    q_grad = model.encoder.layer[0].attention.self.query.weight.grad
    assert q_grad is not None and float(q_grad.abs().max()) > 0
    # Train mode without gradients but with attention dropout: also SDPA (torch's RNG), same result.
    with torch.no_grad():
        _same_draws_without_kernel(*_sdpa_and_switched(_bert().train()), inputs, seed=8)


def test_use_pysparse_attention_leaves_other_models_alone():
    from pysparse.nn import use_pysparse_attention

    eager = _bert("eager")
    said = use_pysparse_attention(eager)
    assert "unchanged" in said and "eager" in said
    assert eager.config._attn_implementation == "eager"
    inputs = _bert_inputs()
    with torch.no_grad():
        calls, _ = kernel_calls(lambda: eager(**inputs))
    assert calls == 0
    linear = nn.Linear(4, 4)
    assert "unchanged" in use_pysparse_attention(linear)
    assert "unchanged" in use_pysparse_attention(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        use_pysparse_attention("bert")


def test_sparsify_fast_attention_report():
    import pysparse

    sdpa = _bert()
    inputs = _bert_inputs()
    sparse = pysparse.sparsify(sdpa, fast_attention=True)
    report = sparse.sparsify_report
    assert isinstance(report.attention, str) and "pysparse" in report.attention
    assert "unchanged" not in report.attention
    assert report.attention in str(report)
    assert sparse.config._attn_implementation == "pysparse_sdpa"
    assert sdpa.config._attn_implementation == "sdpa"  # not in place: the original is untouched
    with torch.no_grad():
        expect = sdpa(**inputs).last_hidden_state
        calls, got = kernel_calls(lambda: sparse(**inputs).last_hidden_state)
    assert calls == 2
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    # With fast_attention=False (the default of an eval model is on) nothing is said or switched; an eager model is
    # reported unchanged.
    plain = pysparse.sparsify(sdpa, fast_attention=False)
    assert plain.sparsify_report.attention is None and plain.config._attn_implementation == "sdpa"
    eager_report = pysparse.sparsify(_bert("eager"), fast_attention=True).sparsify_report
    assert "unchanged" in eager_report.attention and eager_report.attention in str(eager_report)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(int(sys.argv[sys.argv.index("--worker") + 1]))


@pytest.mark.parametrize("causal", [False, True])
def test_padded_batch_masks(causal):
    """A padded batch (entry b keeps keys [0, len_b), len_b = 0 included): the kernel skips the keys past what a
    tile's rows keep; bool masks, -inf float masks, and float masks of finfo.min (transformers' eager style: nothing
    to skip, same result)."""
    gen = _case_gen("padding", causal)
    b, h, s, d = 5, 3, 45, 16
    q, k, v = make_qkv(b, h, h, s, s, d, d, layout="transformers", gen=gen)
    lengths = torch.tensor([45, 20, 1, 0, 33])
    keep = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :].expand(b, 1, s, s)
    additive = torch.zeros(b, 1, s, s).masked_fill(~keep, float("-inf"))
    finfo_min = torch.zeros(b, 1, s, s).masked_fill(~keep, torch.finfo(torch.float32).min)
    for mask in (keep, additive):
        out, _ = check_op(q, k, v, mask, causal, what=f"padding {mask.dtype} causal={causal}")
        assert bool((out[3] == 0).all()), "an entry that keeps no key gives zeros"
    if not causal:
        out_min, _ = check_op(q, k, v, finfo_min, False, what="padding finfo.min")
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=finfo_min).transpose(1, 2)
        assert relative_error(out_min, theirs.double()) < TOL
