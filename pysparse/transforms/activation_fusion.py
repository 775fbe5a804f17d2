"""Finding the activation a model applies right after a linear layer, so the layer can fuse it.

Fusing is only done where the model's own code proves that the activation consumes the layer's output and
nothing else does:

* an ``nn.Sequential`` (its forward not overridden): a layer followed by an activation module, possibly with
  ``nn.Identity`` modules between them (what ``fold_batchnorm`` leaves of a conv -> BatchNorm -> ReLU block);
* a module whose ``forward`` compiles to the same bytecode as ``h = self.a(h); h = self.b(h); return h``
  (transformers' ``BertIntermediate`` and its many copies): ``a`` is the layer, ``b`` the activation.

Bytecode equality (same interpreter, same instructions, constants and argument count) proves the two functions
compute the same thing whatever their names; a decorated, overridden or otherwise different forward simply
does not match, and nothing is fused there.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn import functional as F

from .._module_hooks import has_forward_hooks

__all__ = ["activation_name", "is_plain_identity", "ActivationSite", "activation_sites"]

def _linear_then_activation(self, hidden_states):
    hidden_states = self.dense(hidden_states)
    hidden_states = self.intermediate_act_fn(hidden_states)
    return hidden_states


def _apply_act(self, input):
    return self.act(input)


def _same_code(fn, template) -> bool:
    code, ref = getattr(fn, "__code__", None), template.__code__
    return (code is not None and code.co_code == ref.co_code and code.co_consts == ref.co_consts
            and code.co_argcount == ref.co_argcount and code.co_kwonlyargcount == 0
            and len(code.co_names) == len(ref.co_names) and not code.co_freevars)


def activation_name(module: nn.Module) -> str | None:
    """"relu" / "relu6" / "gelu" when ``module`` computes exactly that ``F`` function (exact GELU), else None."""
    if has_forward_hooks(module):
        return None
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.ReLU6:
        return "relu6"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    # transformers' GELUActivation: forward is `return self.act(input)` with act = F.gelu
    if _same_code(type(module).forward, _apply_act) and type(module).forward.__code__.co_names == ("act",) \
            and getattr(module, "act", None) is F.gelu:
        return "gelu"
    return None


def is_plain_identity(module) -> bool:
    """An ``nn.Identity`` no hook observes: a value passes through it unchanged and unseen."""
    return type(module) is nn.Identity and not has_forward_hooks(module)


@dataclass
class ActivationSite:
    """The activation ``parent.<activation_slot>`` is applied to the output of ``parent.<layer_slot>`` only."""
    parent: nn.Module
    layer_slot: str
    activation_slot: str
    activation: str  # a key of pysparse.ops.ACTIVATIONS


def activation_sites(model: nn.Module) -> list[ActivationSite]:
    """Every (layer, activation) pair whose fusion the model's code proves safe (see the module docstring); the
    layer is any module here: callers check that it is one they can fuse into."""
    sites = []
    for parent in model.modules():
        if has_forward_hooks(parent):
            continue
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            slots = list(parent._modules.items())
            for i, (a, layer) in enumerate(slots):
                j = i + 1
                while j < len(slots) and is_plain_identity(slots[j][1]):
                    j += 1
                name = activation_name(slots[j][1]) if j < len(slots) and slots[j][1] is not None else None
                if layer is not None and name is not None:
                    sites.append(ActivationSite(parent, a, slots[j][0], name))
        elif _same_code(type(parent).forward, _linear_then_activation):
            a, b = type(parent).forward.__code__.co_names
            act = parent._modules.get(b)
            name = activation_name(act) if act is not None else None
            if a in parent._modules and name is not None:
                sites.append(ActivationSite(parent, a, b, name))
    return sites
