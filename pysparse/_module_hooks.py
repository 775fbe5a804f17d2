"""The hooks a user registered on a module: whether it has any that see its forward, and moving them all to a
module that replaces it."""
from __future__ import annotations

from torch import nn

# The hook dictionaries a replaced module hands to its replacement (the dictionaries themselves, so the handles the
# user holds still remove the hooks). State-dict hooks stay behind: they would see the packed layout.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a hook observes ``module``'s forward (its inputs or its output): then no rewrite may change either."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a module about to replace ``old``) every forward and backward hook of ``old``."""
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new._is_full_backward_hook = old._is_full_backward_hook
