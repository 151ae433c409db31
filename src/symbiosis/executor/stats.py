"""Batch statistics of the executor: how many requests and rows each GEMM served, and queue waits.

Only GEMMs that ran are counted, with the requests they served; a batch that failed as a whole and
was re-run request by request counts as a split batch, and each successful re-run as its own GEMM.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass, field

from ..protocol import Direction

_LAYER_INDEX = re.compile(r"\.\d+\.")
_WAIT_SAMPLES = 2048


def op_family(op: str) -> str:
    """``model.layers.3.self_attn.o_proj`` -> ``model.layers.*.self_attn.o_proj`` (one row per op type)."""
    return _LAYER_INDEX.sub(".*.", op)


@dataclass
class OpStats:
    """Counters for one (op, direction)."""

    gemms: int = 0
    requests: int = 0
    rows: int = 0
    clients: int = 0
    shared_gemms: int = 0
    split_batches: int = 0
    wait_s_sum: float = 0.0
    wait_s_max: float = 0.0
    compute_s: float = 0.0
    cpu_s: float = 0.0
    waits: deque = field(default_factory=lambda: deque(maxlen=_WAIT_SAMPLES))

    def merge(self, other: OpStats) -> None:
        self.gemms += other.gemms
        self.requests += other.requests
        self.rows += other.rows
        self.clients += other.clients
        self.shared_gemms += other.shared_gemms
        self.split_batches += other.split_batches
        self.wait_s_sum += other.wait_s_sum
        self.wait_s_max = max(self.wait_s_max, other.wait_s_max)
        self.compute_s += other.compute_s
        self.cpu_s += other.cpu_s
        self.waits.extend(other.waits)

    def summary(self) -> dict[str, float]:
        """Derived figures: requests and rows per GEMM, share of GEMMs with >1 client, split batches, waits in ms."""
        waits = sorted(self.waits)

        def pct(q: float) -> float:
            return 1e3 * waits[min(len(waits) - 1, int(q * len(waits)))] if waits else 0.0

        gemms = max(self.gemms, 1)
        return {
            "gemms": self.gemms,
            "requests": self.requests,
            "rows": self.rows,
            "requests_per_gemm": self.requests / gemms,
            "rows_per_gemm": self.rows / gemms,
            "clients_per_gemm": self.clients / gemms,
            "shared_gemm_fraction": self.shared_gemms / gemms,
            "split_batches": self.split_batches,
            "wait_ms_mean": 1e3 * self.wait_s_sum / max(self.requests, 1),
            "wait_ms_p50": pct(0.50),
            "wait_ms_p99": pct(0.99),
            "wait_ms_max": 1e3 * self.wait_s_max,
            "compute_ms_total": 1e3 * self.compute_s,
            "compute_cpu_ms_total": 1e3 * self.cpu_s,
        }


class BatchStats:
    """Thread-safe batch statistics per (op, direction)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[tuple[str, Direction], OpStats] = {}

    def record(
        self, op: str, direction: Direction, waits: list[float], rows: int, clients: int, compute_s: float, cpu_s: float = 0.0
    ) -> None:
        """Account one GEMM that served ``len(waits)`` requests from ``clients`` distinct clients, in
        ``compute_s`` seconds of wall time and ``cpu_s`` of the computing thread's CPU time."""
        with self._lock:
            stats = self._op(op, direction)
            stats.gemms += 1
            stats.requests += len(waits)
            stats.rows += rows
            stats.clients += clients
            stats.shared_gemms += clients > 1
            stats.wait_s_sum += sum(waits)
            stats.wait_s_max = max(stats.wait_s_max, max(waits))
            stats.compute_s += compute_s
            stats.cpu_s += cpu_s
            stats.waits.extend(waits)

    def record_split(self, op: str, direction: Direction) -> None:
        """Account a batch of several requests that failed as a whole and is re-run request by request."""
        with self._lock:
            self._op(op, direction).split_batches += 1

    def _op(self, op: str, direction: Direction) -> OpStats:
        """The counters of (op, direction), created on first use (called with the lock held)."""
        stats = self._ops.get((op, direction))
        if stats is None:
            stats = self._ops[op, direction] = OpStats()
        return stats

    def reset(self) -> None:
        with self._lock:
            self._ops.clear()

    def per_op(self) -> dict[tuple[str, Direction], OpStats]:
        """A copy of the counters of every (op, direction) seen."""
        with self._lock:
            copies = {}
            for key, stats in self._ops.items():
                copy = OpStats()
                copy.merge(stats)
                copies[key] = copy
            return copies

    def by_family(self) -> dict[tuple[str, Direction], dict[str, float]]:
        """Summaries with layer indices folded (one row per op type and direction)."""
        families: dict[tuple[str, Direction], OpStats] = {}
        for (op, direction), stats in self.per_op().items():
            families.setdefault((op_family(op), direction), OpStats()).merge(stats)
        return {key: stats.summary() for key, stats in sorted(families.items())}

    def total(self) -> dict[str, float]:
        """One summary over every op and direction."""
        total = OpStats()
        for stats in self.per_op().values():
            total.merge(stats)
        return total.summary()
