"""What a client needs from an executor, wherever it runs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from ..protocol import ModelSpec, OpRequest


@runtime_checkable
class Transport(Protocol):
    """A client's connection to a base executor (in-process, shared memory, or network).

    ``spec()`` and ``tensors()`` are called once while the client builds its model; ``run()`` is
    called for every op and must be safe to call from several threads at once.
    """

    def spec(self) -> ModelSpec:
        """The executor's model spec."""
        ...

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Frozen tensors by name (norms, embeddings, rotary buffers, biases)."""
        ...

    def run(self, request: OpRequest) -> torch.Tensor:
        """Execute one op request; raises ``BadRequestError`` for a request the executor refuses."""
        ...
