"""A fingerprint of a base's weights, so that shards of different bases are not combined.

Every shard of a sharded base holds all the frozen tensors (norms, embeddings, biases, buffers)
whatever its layer range, so their digest identifies the base: SHA-256 over each tensor's name,
dtype, shape and bytes, in name order. (The shards' configs, compared too, include the dtype.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from ..protocol import ModelSpec
from .base import Transport
from .wire import tensor_bytes

#: Elements hashed per step (bounds the host copy of a large embedding table on an accelerator).
_CHUNK = 1 << 24


def base_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The hex SHA-256 of ``tensors`` (the frozen tensors of a spec, all of them)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            digest.update(tensor_bytes(flat[start : start + _CHUNK]))
    return digest.hexdigest()


def fingerprint_of(transport: Transport, spec: ModelSpec) -> str:
    """The fingerprint of the base behind ``transport``: as its server reports it, or computed here
    from its frozen tensors (an executor in this process)."""
    reported = getattr(transport, "fingerprint", None)
    return reported() if callable(reported) else base_fingerprint(transport.tensors(spec.tensors))
