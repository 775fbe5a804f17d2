"""What every packed weight format shares: float values plus two int32 index arrays on the values' device."""
from __future__ import annotations

import torch


class PackedWeight:
    """Base of the packed formats. A subclass stores ``values``, ``shape`` and the two index tensors named in
    ``_index_names``, and its constructor takes ``(values, *indices, shape)`` and validates them."""

    _index_names: tuple[str, str]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form: values plus both index arrays."""
        tensors = (self.values, *(getattr(self, name) for name in self._index_names))
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, *args, **kwargs):
        """Move / cast the values like ``Tensor.to``; indices follow the device and stay int32."""
        values = self.values.to(*args, **kwargs)
        indices = (getattr(self, name).to(values.device) for name in self._index_names)
        return type(self)(values, *indices, self.shape)
