"""How much memory a client really holds for its model."""

from __future__ import annotations

import torch
from torch import nn

from .phantom import PhantomWeight


def resident_bytes(model: nn.Module, *, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the parameter and buffer storages ``model`` holds (each storage once).

    Phantom weights of executor ops hold nothing and count zero; tensors in ``exclude`` (and
    anything sharing their storage) are left out.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if isinstance(tensor, PhantomWeight):
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in skip or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
