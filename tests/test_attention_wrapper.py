"""The drop-in ``pysparse.ops.scaled_dot_product_attention``: which calls run the CPU kernel and which fall back to
torch's function (dropout, gradients, other dtypes, 3-D inputs, torch's own errors), and the op under torch.library's
opcheck and torch.compile. The kernel itself is tested in test_attention.py, whose helpers this file reuses.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import relative_error
from pysparse import ops
from test_attention import LAYOUTS, OP, TOL, _case_gen, kernel_calls, make_mask, make_qkv, reference

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
    assert yes(q.requires_grad_(), k, v, enable_gqa=True)      # gradients: attention_forward / _backward
    q.requires_grad_(False)
    assert not yes(q, k, v, m.float().requires_grad_(), enable_gqa=True)  # a mask's gradient: torch's
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
