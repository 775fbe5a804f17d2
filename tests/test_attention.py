"""CPU scaled-dot-product attention: the op ``torch.ops.pysparse.attention``, the drop-in wrapper
``pysparse.ops.scaled_dot_product_attention`` (and its fallbacks to torch's function); the transformers glue is
tested in test_attention_switch.py.

Every result is compared with the float64 oracle ``attention_reference`` (itself checked against torch's float64
SDPA) on fresh random inputs drawn from the session seed: odd head dims, ragged and unequal sequence lengths,
grouped-query heads, transformers' strided views, bool / float masks of every broadcast shape, causal masking, and
the empty cases. Each ISA path runs in its own interpreter (this file as a script with --worker), as in
test_cpu_kernels_isa.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import SEED, assert_matches_reference, generator_for, op_calls, relative_error
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
    counts, result = op_calls(fn)
    return counts.get("pysparse::attention", 0), result


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


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(int(sys.argv[sys.argv.index("--worker") + 1]))
