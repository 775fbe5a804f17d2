"""Base of the layers that hold a packed weight (``values`` plus the format's two index buffers), and the helpers
that turn such a layer back into its dense equivalent."""
from __future__ import annotations

import torch
from torch import nn


class PackedWeightModule(nn.Module):
    """Loads a checkpoint holding another sparsity pattern (other tensor sizes): the packed parts are validated by
    building the format from them, then adopted, instead of failing on the size mismatch. A subclass names its
    format in ``_weight_class`` and returns the dense weight shape from ``_packed_shape()``."""

    _weight_class: type

    def _packed_shape(self) -> tuple:
        raise NotImplementedError

    def _packed_parts(self) -> tuple:
        """``(values, *indices, bias)`` for a forward, read from the module's own dicts: ``self.values`` (a buffer or
        parameter) is found only by ``nn.Module.__getattr__``, a Python function called after the normal lookup (the
        class's MRO, the instance dict) has failed: ~2 us per name on a slow core, as much as the whole kernel at
        batch 1. ``values`` is a buffer, or a parameter when trainable; the indices are buffers and ``bias`` a
        parameter (or None) by construction."""
        params, buffers = self._parameters, self._buffers
        first, second = self._weight_class._index_names
        try:
            values = buffers["values"] if "values" in buffers else params["values"]
            return values, buffers[first], buffers[second], params["bias"]
        except KeyError:  # a part deleted or re-registered by hand: the normal lookup, with its normal error
            return tuple(getattr(self, name) for name in ("values", first, second, "bias"))

    def _settle_layout(self) -> None:
        """Called whenever the packed parts were replaced or moved (construction, load, ``.to()``): a subclass
        puts ``values`` in the memory layout its kernels read on that device and dtype. Default: as it is."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._settle_layout()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = ("values", *self._weight_class._index_names)
        if not all(prefix + n in state_dict for n in names):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            return
        values, *indices = (state_dict[prefix + n] for n in names)
        dev = self.values.device
        try:
            w = self._weight_class(values.to(dev, self.values.dtype), *(i.to(dev) for i in indices),
                                   self._packed_shape())
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"invalid packed weight for {prefix or type(self).__name__}: {exc}")
            return
        values = w.values
        if isinstance(self.values, nn.Parameter):
            # Keep the Parameter object that optimizers hold when the pattern size allows it.
            if self.values.shape == values.shape:
                with torch.no_grad():
                    values = self.values.copy_(values)
            else:
                values = nn.Parameter(values, requires_grad=self.values.requires_grad)
        self.values = values
        for n in names[1:]:
            setattr(self, n, getattr(w, n))
        state_dict = {k: v for k, v in state_dict.items() if k not in {prefix + n for n in names}}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for n in names:  # they were loaded above, not missing
            if prefix + n in missing_keys:
                missing_keys.remove(prefix + n)
        self._settle_layout()


def fill_dense(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Copy a packed layer's dense ``weight`` (already in ``module.weight``'s shape) and ``bias`` into the freshly
    built dense ``module``; returns it (the shared tail of every ``to_linear`` / ``to_conv2d``)."""
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


# The module form of each fusable activation (what a fused layer turns back into when made dense again).
ACTIVATION_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU}


def with_activation(layer: nn.Module, activation: str | None) -> nn.Module:
    """``layer`` followed by ``activation``'s module (``nn.Sequential``), or ``layer`` itself when None: the dense
    equivalent of a pysparse layer that applies the activation itself."""
    return layer if activation is None else nn.Sequential(layer, ACTIVATION_MODULES[activation]())
