"""pysparse_gelu_while: a model's exact-GELU modules (nn.GELU(), transformers' GELUActivation) run pysparse's GELU
inside the block, with the model's outputs and gradients unchanged within float32 rounding, and the model's own
modules back afterwards (on error too); tanh-approximate GELU, hooked modules and other activations stay."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import generator_for, op_calls
from pysparse.transforms.gelu_switch import pysparse_gelu_while


def _kernel_calls(fn):
    counts, result = op_calls(fn)
    return counts.get("pysparse::gelu", 0), counts.get("pysparse::gelu_backward", 0), result


def _model():
    torch.manual_seed(0)
    hooked = nn.GELU()
    hooked.register_forward_hook(lambda m, i, o: None)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 20), nn.GELU(approximate="tanh"),
                         nn.Linear(20, 20), hooked, nn.Sequential(nn.Linear(20, 16), nn.GELU()), nn.ReLU())


def test_swaps_exact_gelu_only_and_restores():
    model = _model()
    before = list(model.modules())
    x = torch.randn(7, 12, generator=generator_for("gelu-switch"), requires_grad=True)
    expect = model(x)
    expect.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    with pysparse_gelu_while(model) as swapped:
        assert swapped == 2  # model[1] and model[6][1]; not the tanh one, not the hooked one
        assert type(model[1]) is not nn.GELU and type(model[6][1]) is not nn.GELU
        assert type(model[3]) is nn.GELU and type(model[5]) is nn.GELU
        forward, backward, got = _kernel_calls(lambda: model(x2))
        assert forward == 2
        _, backward, _ = _kernel_calls(lambda: got.sum().backward())
        assert backward == 2
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-5)
    assert list(model.modules()) == before
    assert model.state_dict().keys() == _model().state_dict().keys()


def test_restores_on_error():
    model = _model()
    before = list(model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with pysparse_gelu_while(model):
            raise RuntimeError("boom")
    assert list(model.modules()) == before


def test_transformers_gelu_activation():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (2, 9), generator=generator_for("gelu-switch-bert"))
    with torch.no_grad():
        expect = model(input_ids=ids).last_hidden_state
        with pysparse_gelu_while(model) as swapped:
            assert swapped == 2
            calls, _, got = _kernel_calls(lambda: model(input_ids=ids).last_hidden_state)
    assert calls == 2
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    assert type(model.encoder.layer[0].intermediate.intermediate_act_fn).__name__ == "GELUActivation"


def test_refuses_a_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        with pysparse_gelu_while(3):
            pass
