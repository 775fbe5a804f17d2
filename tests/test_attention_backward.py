"""Attention in training: ``pysparse::attention_forward`` (output and per-row log-sum-exp) and
``pysparse::attention_backward`` (dq, dk, dv), reached through autograd by ``pysparse.ops.scaled_dot_product_attention``
when query, key or value wants a gradient.

Every gradient is compared with float64 autograd through a reference that gives rows which see no key a constant
zero output (so they pass no gradient, as the kernel's), on fresh random inputs from the session seed: the shapes,
layouts and masks of test_attention.py, grouped-query heads, causal attention, padded batches, the empty cases.
The generic and AVX2 paths run in test_attention.py's per-ISA workers and in ctest (tests/cpp/test_attention.cpp).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SEED, op_calls, relative_error
from pysparse import ops
from test_attention import EMPTY_SHAPES, MASK_SHAPES, SHAPES, _case_gen, _shape_id, make_mask, make_qkv
from test_attention_wrapper import _opcheck_samples  # the inference op's samples, the empty key set among them

TOL = 1e-5  # float32, relative to the largest reference gradient
FORWARD = torch.ops.pysparse.attention_forward.default
BACKWARD = torch.ops.pysparse.attention_backward.default


def reference_with_grads(q, k, v, grad, mask=None, causal=False, scale=None):
    """float64 output [B, Sq, H, Dv], log-sum-exp [B, H, Sq] and the gradients of q, k, v for the output gradient
    ``grad`` ([B, Sq, H, Dv]). A row that sees no key has output 0 and lse +inf."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = qd.shape[1] // kd.shape[1]
    ke, ve = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    if scale is None:
        scale = qd.shape[-1] ** -0.5 if qd.shape[-1] else 1.0
    scores = qd @ ke.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    if causal:
        keep = torch.ones(qd.shape[2], kd.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    sees = (scores > float("-inf")).any(-1, keepdim=True)
    weights = torch.where(sees, torch.softmax(torch.where(sees, scores, 0.0), dim=-1), 0.0)
    out = (weights @ ve).transpose(1, 2)
    lse = torch.where(sees, torch.logsumexp(torch.where(sees, scores, 0.0), -1, keepdim=True), float("inf"))
    out.backward(grad.double())
    return out.detach(), lse.squeeze(-1).detach(), qd.grad, kd.grad, vd.grad


def check_grads(q, k, v, mask=None, causal=False, scale=None, gen=None, what="", tol=TOL):
    """Runs the op through autograd with a random output gradient and checks output, lse and every gradient."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = FORWARD(q, k, v, mask, causal, scale)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    ref_out, ref_lse, *ref_grads = reference_with_grads(q, k, v, grad, mask, causal, scale)
    ctx = f"{what} (seed {SEED})"
    assert relative_error(out.detach(), ref_out) < TOL, ctx
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{ctx}: rows that see no key"
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5), ctx
    for name, t, ref in zip("qkv", (q, k, v), ref_grads):
        got = t.grad
        assert got is not None and got.shape == t.shape and got.dtype == torch.float32, f"{ctx}: d{name}"
        assert bool(torch.isfinite(got).all()), f"{ctx}: d{name} has NaN/inf"
        err = relative_error(got, ref)
        assert err < tol, f"{ctx}: d{name} relative error {err:.3g}"
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_gradients_match_reference(shape, causal):
    i = SHAPES.index(shape)
    gen = _case_gen("grad", shape, causal)
    for layout in ("transformers", ["contiguous", "sliced", "lastdim", "expanded"][i % 4]):
        q, k, v = make_qkv(*shape, layout=layout, gen=gen)
        check_grads(q, k, v, causal=causal, gen=gen, what=f"{_shape_id(shape)} {layout} causal={causal}")


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_gradients_with_masks(shape, kind):
    """Masks of every broadcast shape (random keys dropped, -inf in float masks), with and without is_causal; row 0
    of batch 0 sees no key."""
    b, h, _, sq, skv, _, _ = shape
    gen = _case_gen("grad-mask", shape, kind)
    q, k, v = make_qkv(*shape, layout="transformers", gen=gen)
    for j, causal in enumerate((False, True)):
        mshape = MASK_SHAPES[(SHAPES.index(shape) + j) % len(MASK_SHAPES)]
        mask = make_mask(kind, mshape, b, h, sq, skv, gen).clone()
        if mshape not in ("expanded", "transposed", "111K", "QK"):
            mask[0, :, 0] = False if kind == "bool" else float("-inf")
        check_grads(q, k, v, mask, causal, gen=gen, what=f"{_shape_id(shape)} {kind} {mshape} causal={causal}")


def test_padded_batch_gradients():
    """A padded batch (entry b keeps keys [0, len_b), 0 included): the padded keys get zero dk / dv, the entry that
    keeps no key gets zero gradients everywhere."""
    gen = _case_gen("grad-padding")
    b, h, s, d = 4, 3, 45, 16
    q, k, v = make_qkv(b, h, h, s, s, d, d, layout="transformers", gen=gen)
    lengths = torch.tensor([45, 20, 0, 33])
    keep = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    dq, dk, dv = check_grads(q, k, v, keep, gen=gen, what="padding")
    assert bool((dq[2] == 0).all()) and bool((dk[2] == 0).all()) and bool((dv[2] == 0).all())
    assert bool((dk[1, :, 20:] == 0).all()) and bool((dv[1, :, 20:] == 0).all())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rows_without_gradient(causal):
    """Query rows whose output gradient is zero (padding under a loss over the real positions: right padding, and
    scattered rows) pass nothing back and are skipped: the gradients still match the reference exactly as above, and
    those rows' dq is exactly zero."""
    gen = _case_gen("grad-zero-rows", causal)
    b, h, s, d = 3, 4, 45, 16
    q, k, v = make_qkv(b, h, h // 2, s, s, d, d, layout="transformers", gen=gen)
    lengths = torch.tensor([45, 20, 7])
    keep = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = FORWARD(q, k, v, None if causal else keep, causal, None)
    grad = torch.randn(out.shape, generator=gen)
    real = torch.arange(s)[None, :] < lengths[:, None]
    real[0, 10:30:3] = False
    grad[~real] = 0
    out.backward(grad)
    _, _, *refs = reference_with_grads(q, k, v, grad, None if causal else keep, causal)
    for name, t, ref in zip("qkv", (q, k, v), refs):
        assert relative_error(t.grad, ref) < TOL, f"d{name} (seed {SEED})"
    assert bool((q.grad.transpose(1, 2)[~real] == 0).all())


def test_rows_without_gradient_still_propagate_nan():
    """A NaN in the q row of a query without gradient reaches dk and dq through 0 x NaN in a dense computation:
    such a row is not skipped, and the NaNs land where the float64 reference has them."""
    gen = _case_gen("grad-zero-rows-nan")
    q, k, v = make_qkv(2, 2, 2, 13, 13, 8, 8, gen=gen)
    q[1, 0, 9, 2] = float("nan")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = FORWARD(q, k, v, None, False, None)
    grad = torch.randn(out.shape, generator=gen)
    grad[:, 6:] = 0
    out.backward(grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))  # plain softmax: every row sees keys
    (torch.softmax(qd @ kd.transpose(-1, -2) * 8 ** -0.5, -1) @ vd).transpose(1, 2).backward(grad.double())
    for name, t, ref in zip("qkv", (q, k, v), (qd.grad, kd.grad, vd.grad)):
        assert torch.equal(torch.isnan(t.grad), torch.isnan(ref)), f"d{name}"
        assert bool(torch.isnan(ref).any()), f"d{name}"


def test_large_scores_give_finite_gradients():
    """Scores in the hundreds (exp overflows without the row's lse): finite gradients; dv within 1e-4 (the weights
    exp(score - lse) carry the float32 rounding of scores in the hundreds: |score| ulps, ~2e-5). dq and dk of
    saturated rows are differences of near-equal terms (dS = P (dP - rowsum)), as ill-conditioned in torch's float32
    kernel, so their error is bounded against the size of those terms: scale x max|dP| x max|k| (or |q|)."""
    gen = _case_gen("grad-large")
    for causal, scale in ((False, None), (True, 0.7)):
        q, k, v = make_qkv(2, 2, 2, 17, 23, 16, 8, gen=gen)
        q, k = (q * 30).requires_grad_(), (k * 30).requires_grad_()
        v.requires_grad_()
        assert float((q @ k.transpose(-1, -2)).detach().abs().max()) > 300
        out, _ = FORWARD(q, k, v, None, causal, scale)
        grad = torch.randn(out.shape, generator=gen)
        out.backward(grad)
        _, _, ref_q, ref_k, ref_v = reference_with_grads(q, k, v, grad, None, causal, scale)
        assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
        assert relative_error(v.grad, ref_v) < 1e-4
        s = scale if scale is not None else 16 ** -0.5
        max_dp = float(grad.abs().max() * v.detach().abs().max()) * v.shape[-1]
        for t, ref, other in ((q, ref_q, k), (k, ref_k, q)):
            bound = 1e-5 * s * max_dp * float(other.detach().abs().max())
            assert float((t.grad.double() - ref).abs().max()) < bound, f"causal={causal}"


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_shape_id)
def test_empty_sizes(shape):
    """Gradients of the inputs' shapes; with no keys the output is a constant 0, so dq is 0."""
    gen = _case_gen("grad-empty", shape)
    q, k, v = (t.requires_grad_() for t in make_qkv(*shape, gen=gen))
    out, lse = FORWARD(q, k, v, None, False, None)
    out.backward(torch.randn(out.shape, generator=gen))
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape
        assert bool((t.grad == 0).all()) or shape[4] > 0
    assert bool(torch.isinf(lse).all()) or shape[4] > 0


def test_threads_give_identical_gradients():
    """One thread or two: each (batch, kv head) is computed the same way, so the gradients are bitwise equal."""
    gen = _case_gen("grad-threads")
    q, k, v = make_qkv(3, 6, 2, 37, 41, 24, 16, layout="transformers", gen=gen)
    grad = torch.randn(3, 37, 6, 16, generator=gen)
    out, lse = FORWARD(q, k, v, None, True, None)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(BACKWARD(grad, q, k, v, out, lse, None, True, None))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_wrapper_trains_through_the_kernel_like_torch():
    """scaled_dot_product_attention with inputs that want gradients runs attention_forward (once) and gives torch's
    output and gradients; a mask that wants a gradient goes to torch."""
    gen = _case_gen("grad-wrapper")
    base = make_qkv(2, 6, 2, 7, 10, 8, 5, layout="transformers", gen=gen)
    mask = make_mask("float", "B1QK", 2, 6, 7, 10, gen)
    mask[..., 0] = 0.0
    grads = []
    for fn in (ops.scaled_dot_product_attention, F.scaled_dot_product_attention):
        q, k, v = (t.detach().clone().requires_grad_() for t in base)
        def step():
            out = fn(q, k, v, attn_mask=mask, enable_gqa=True)
            (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
            return out

        counts, out = op_calls(step)
        if fn is ops.scaled_dot_product_attention:
            assert counts.get("pysparse::attention_forward") == 1 and counts.get("pysparse::attention_backward") == 1
        grads.append((out.detach(), q.grad, k.grad, v.grad))
    for ours, theirs in zip(*grads):
        assert bool(torch.isfinite(ours).all()) and float(ours.abs().max()) > 0
        assert relative_error(ours, theirs.double()) < TOL
    q, k, v = (t.detach().clone().requires_grad_() for t in base)
    m = mask.clone().requires_grad_()
    counts, _ = op_calls(lambda: ops.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True).sum()
                         .backward())
    assert not any(key.startswith("pysparse::attention") for key in counts)
    assert m.grad is not None


def _valid_backward():
    gen = _case_gen("grad-bad")
    q, k, v = make_qkv(1, 4, 2, 3, 5, 8, 6, gen=gen)
    out, lse = FORWARD(q, k, v, None, False, None)
    return dict(grad_out=torch.randn(out.shape, generator=gen), query=q, key=k, value=v, out=out, logsumexp=lse,
                attn_mask=None, is_causal=False, scale=None)


BAD = {
    "grad_out shape": ({"grad_out": lambda a: a["grad_out"][:, :2]}, ValueError,
                       r"grad_out must have shape \[1, 3, 4, 6\], got \[1, 2, 4, 6\]"),
    "grad_out float64": ({"grad_out": lambda a: a["grad_out"].double()}, TypeError, r"grad_out must be float32"),
    "out shape": ({"out": lambda a: a["out"][..., :5]}, ValueError, r"out must have shape"),
    "logsumexp shape": ({"logsumexp": lambda a: a["logsumexp"][:, :3]}, ValueError,
                        r"logsumexp must have shape \[1, 4, 3\]"),
    "logsumexp bfloat16": ({"logsumexp": lambda a: a["logsumexp"].bfloat16()}, TypeError,
                           r"logsumexp must be float32"),
    "value length": ({"value": lambda a: torch.randn(1, 2, 4, 6)}, ValueError, r"value must have key's heads"),
    "mask Skv": ({"attn_mask": lambda a: torch.zeros(1, 1, 3, 6)}, ValueError, r"attn_mask must broadcast"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_backward_refuses_bad_input(name):
    change, error, match = BAD[name]
    args = _valid_backward()
    BACKWARD(*args.values())  # the unchanged call is fine
    for arg, value in change.items():
        args[arg] = value(args)
    with pytest.raises(error, match=match):
        BACKWARD(*args.values())


@pytest.mark.parametrize("sample", list(_opcheck_samples()))
def test_opcheck(sample):
    q, k, v, *rest = _opcheck_samples()[sample]
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *rest)
    torch.library.opcheck(FORWARD, args)
    out, lse = FORWARD(*(t.detach() for t in args[:3]), *rest)
    torch.library.opcheck(BACKWARD, (torch.randn_like(out), *(t.detach() for t in args[:3]), out, lse, *rest))


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) of forward + backward through the wrapper: one graph, eager's gradients."""
    from torch._dynamo.testing import CompileCounter

    def step(q, k, v, m):
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        return (out * out).sum()

    gen = _case_gen("grad-compile")
    base = make_qkv(2, 4, 2, 7, 11, 8, 8, layout="transformers", gen=gen)
    m = make_mask("bool", "B1QK", 2, 4, 7, 11, gen)
    torch._dynamo.reset()
    counter = CompileCounter()
    grads = []
    for fn in (step, torch.compile(step, backend=counter, fullgraph=True)):
        q, k, v = (t.detach().clone().requires_grad_() for t in base)
        fn(q, k, v, m).backward()
        grads.append((q.grad, k.grad, v.grad))
    assert counter.frame_count == 1
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
