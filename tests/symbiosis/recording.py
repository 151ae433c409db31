"""A transport that records every op request an executor ran: who sent it, which way, at what priority."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from symbiosis import BaseExecutor
from symbiosis.protocol import Direction, ModelSpec, OpRequest


@dataclass(frozen=True)
class Recorded:
    """One op request as the executor ran it, and when it completed (``time.perf_counter``)."""

    client_id: str
    direction: Direction
    priority: int
    time: float


class RecordingTransport:
    """The in-process executor as a client's transport, keeping a ``Recorded`` entry per op request."""

    def __init__(self, executor: BaseExecutor) -> None:
        self.executor = executor
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()

    def spec(self) -> ModelSpec:
        return self.executor.spec()

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return self.executor.tensors(names)

    def run(self, request: OpRequest) -> torch.Tensor:
        out = self.executor.run(request)
        with self._lock:
            self.requests.append(Recorded(request.client_id, request.direction, request.priority, time.perf_counter()))
        return out

    def priorities(self, direction: Direction) -> set[int]:
        """The priorities that requests in ``direction`` carried."""
        with self._lock:
            return {r.priority for r in self.requests if r.direction is direction}
