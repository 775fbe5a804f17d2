"""The transformers glue of pysparse's CPU attention: ``pysparse.nn.use_pysparse_attention`` and
``sparsify(fast_attention=True)`` switch a BERT-style model to the kernel, in inference and in training without
attention dropout (SDPA where dropout or a model that does not run "sdpa" needs it), and report what they did. The
kernel itself is tested in test_attention.py and test_attention_backward.py, whose helpers this file reuses.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import op_calls
from test_attention import _case_gen, kernel_calls

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


def test_bert_training_runs_the_kernel():
    """With gradients (train mode, attention dropout off) the switched model trains through pysparse's forward and
    backward: same outputs and parameter gradients as the sdpa model under the same seed (the hidden dropout is drawn
    the same way). With attention dropout on, SDPA runs (torch's RNG), same result."""
    sdpa, model = _sdpa_and_switched(_bert(attention_probs_dropout_prob=0.0).train())
    inputs = _bert_inputs()
    torch.manual_seed(7)
    expect = sdpa(**inputs).last_hidden_state
    # A random projection of the output as the loss (the sum of squares of a layer-normed output is nearly constant:
    # its gradients would be rounding residue).
    weights = torch.randn(expect.shape, generator=_case_gen("bert-loss"))
    torch.manual_seed(7)
    def step():
        got = model(**inputs).last_hidden_state
        (got * weights).sum().backward()
        return got

    counts, got = op_calls(step)
    assert counts.get("pysparse::attention_forward") == 2 and counts.get("pysparse::attention_backward") == 2
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    (expect * weights).sum().backward()
    for (name, p_ref), (_, p) in zip(sdpa.named_parameters(), model.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        # Gradients summed over every token (the embeddings') are larger, their rounding with them.
        scale = max(float(p_ref.grad.abs().max()), 1.0)
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    q_grad = model.encoder.layer[0].attention.self.query.weight.grad
    assert q_grad is not None and float(q_grad.abs().max()) > 0
    # Train mode with attention dropout: SDPA (torch's RNG), same result.
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
