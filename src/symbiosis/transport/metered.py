"""A transport wrapper that counts a client's requests and times them, per op family and direction."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import numpy as np
import torch

from ..executor.stats import op_family
from ..protocol import ModelSpec, OpRequest
from .base import Transport


class MeteredTransport:
    """Passes every call to ``inner``; counts completed and failed requests and keeps latencies."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.completed = 0
        self.failed = 0
        self._latencies: dict[str, list[float]] = {}

    def spec(self) -> ModelSpec:
        return self.inner.spec()

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return self.inner.tensors(names)

    def run(self, request: OpRequest) -> torch.Tensor:
        start = time.perf_counter()
        try:
            y = self.inner.run(request)
        except Exception:
            with self._lock:
                self.failed += 1
            raise
        seconds = time.perf_counter() - start
        key = f"{op_family(request.op)} {request.direction.name.lower()}"
        with self._lock:
            self.completed += 1
            self._latencies.setdefault(key, []).append(seconds)
        return y

    def latencies(self) -> dict[str, list[float]]:
        """Round-trip seconds of completed requests per ``"<op family> <direction>"``."""
        with self._lock:
            return {key: list(values) for key, values in self._latencies.items()}


def percentiles_us(samples: Iterable[float], qs: Iterable[float] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ..., "n": ...}`` of ``samples`` (seconds) in microseconds."""
    values = np.asarray(list(samples), dtype=float)
    out = {f"p{q:g}": float(np.percentile(values, q) * 1e6) if values.size else float("nan") for q in qs}
    out["n"] = int(values.size)
    return out
