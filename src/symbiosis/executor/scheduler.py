"""Opportunistic per-op batching by flat combining.

Every caller enqueues its request. Whoever finds the executor idle becomes the *combiner*: it takes
the most urgent queue (requests for one op and direction that agree on the product: compute dtype,
weight rounding, output features), runs all of its waiting requests as one GEMM, hands every result back and repeats until
its own request is done; then another waiter takes over. A lone
client therefore pays no thread hand-off, and concurrent clients meet in the same GEMM. Nothing
waits for a batch to fill unless ``max_wait_s`` asks for it, and even then a batch stops waiting as
soon as every client active in its lane (one that sent a request or got an answer within
``active_window_s``, default ``ACTIVE_WINDOW_S``) has a request queued: a client blocked on
another op cannot join, so waiting longer would only add latency. A lone client therefore never
waits, and clients stepping through the same ops together leave each op as soon as the last of
them reaches it.

Inference requests (priority 0) have a lane of their own (``inference_lane``, the default): they
are batched and run by their own combiner, concurrently with whatever GEMM the other lane is
running, so a decode step never waits behind a fine-tuning GEMM (a 256-row LM-head product takes
a quarter of a second on a CPU). Within a lane, urgency is earliest-deadline-first with
``deadline = arrival + priority * aging_s``, so a lower-priority request that has waited long
enough outranks newer urgent ones and no client starves; each request beyond the first waiting for
an op advances that op's deadline by ``batch_credit_s``, so that clients that reach an op together
leave it together. Without the inference lane, all priorities share one lane under the same rule.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..protocol import PRIORITY_INFERENCE, Direction, OpRequest
from .stats import BatchStats

#: Runs one batch: (op name, direction, requests) -> one output per request, in order.
BatchRunner = Callable[[str, Direction, Sequence[OpRequest]], list[torch.Tensor]]


#: ``OpRequest.batch_key()``: op, direction, and what the product is (dtypes, output features).
_Key = tuple
_Queues = dict[_Key, list["_Pending"]]

#: A client idle this long (no request queued, no answer received) no longer holds back a filling batch.
ACTIVE_WINDOW_S = 0.25


@dataclass(eq=False)
class _Pending:
    request: OpRequest
    arrival: float
    deadline: float
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class BatchScheduler:
    """Batches concurrent requests with equal ``OpRequest.batch_key()``; thread-safe; see module docstring."""

    def __init__(
        self,
        run_batch: BatchRunner,
        stats: BatchStats,
        *,
        max_rows: int | None = None,
        max_wait_s: float = 0.0,
        aging_s: float = 0.02,
        batch_credit_s: float = 0.005,
        inference_lane: bool = True,
        active_window_s: float | None = None,
    ) -> None:
        active_window_s = ACTIVE_WINDOW_S if active_window_s is None else active_window_s
        if min(max_wait_s, aging_s, batch_credit_s, active_window_s) < 0:
            raise ValueError("max_wait_s, aging_s, batch_credit_s and active_window_s must be >= 0")
        if max_rows is not None and max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self._run_batch = run_batch
        self._stats = stats
        self._max_rows = max_rows
        self._max_wait_s = max_wait_s
        self._aging_s = aging_s
        self._batch_credit_s = batch_credit_s
        self._active_window_s = active_window_s
        self._cond = threading.Condition()
        self._inference_lane = inference_lane
        self._queues: list[_Queues] = [{} for _ in range(2 if inference_lane else 1)]
        self._busy = [False] * len(self._queues)
        self._last_seen: list[dict[str, float]] = [{} for _ in self._queues]  # client -> its latest request or answer, per lane
        self._closed = False

    def run(self, request: OpRequest) -> torch.Tensor:
        """Execute ``request`` (batched with whatever else is waiting) and return its output."""
        now = time.perf_counter()
        lane = 1 if self._inference_lane and request.priority > PRIORITY_INFERENCE else 0
        pending = _Pending(request, now, now + max(request.priority, 0) * self._aging_s)
        with self._cond:
            if self._closed:
                raise RuntimeError("the executor is closed")
            self._queues[lane].setdefault(request.batch_key(), []).append(pending)
            if self._max_wait_s > 0:
                self._last_seen[lane][request.client_id] = now
                self._cond.notify_all()  # a combiner waiting for its batch to fill re-checks it
            while not pending.done:
                if self._busy[lane]:
                    self._cond.wait()
                    continue
                self._busy[lane] = True
                try:
                    key, batch = self._take_batch(lane)
                    self._cond.release()
                    try:
                        self._execute(key, batch)
                    finally:
                        self._cond.acquire()
                finally:
                    self._busy[lane] = False
                    self._cond.notify_all()
            if self._max_wait_s > 0:
                self._last_seen[lane][request.client_id] = time.perf_counter()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def queue_depth(self) -> int:
        """Requests waiting right now (not counting the batch being computed)."""
        with self._cond:
            return sum(len(queue) for queues in self._queues for queue in queues.values())

    def close(self) -> None:
        """Refuse new requests; requests already queued still complete."""
        with self._cond:
            self._closed = True

    def _take_batch(self, lane: int) -> tuple[_Key, list[_Pending]]:
        """Pop the most urgent of a lane's queues (up to ``max_rows``). Called with the lock held."""
        queues = self._queues[lane]
        while True:
            key = next(iter(queues)) if len(queues) == 1 else min(queues, key=lambda k: self._urgency(queues[k]))
            queue = queues[key]
            if len(queue) > 1:
                queue.sort(key=lambda p: p.deadline)
            if self._max_wait_s <= 0:
                break
            wait_left = queue[0].arrival + self._max_wait_s - time.perf_counter()
            if wait_left <= 0 or (self._max_rows is not None and sum(p.request.rows for p in queue) >= self._max_rows):
                break
            recheck = self._until_recheck(lane)
            if recheck <= 0:
                break
            self._cond.wait(min(wait_left, recheck))
        if self._max_rows is None:
            del queues[key]
            return key, queue
        batch, rows = [], 0
        for pending in queue:
            if batch and rows + pending.request.rows > self._max_rows:
                break
            batch.append(pending)
            rows += pending.request.rows
        rest = queue[len(batch):]
        if rest:
            queues[key] = rest
        else:
            del queues[key]
        return key, batch

    def _until_recheck(self, lane: int) -> float:
        """How long a filling batch of ``lane`` may wait before it looks again: 0 when every active
        client already has a request queued (none can join by waiting), else until the first active
        client not queued goes idle. Called with the lock held."""
        now = time.perf_counter()
        last_seen = self._last_seen[lane]
        for client in [c for c, t in last_seen.items() if now - t > self._active_window_s]:
            del last_seen[client]
        waiting = {p.request.client_id for queue in self._queues[lane].values() for p in queue}
        on_their_way = [t for c, t in last_seen.items() if c not in waiting]
        return min(on_their_way) + self._active_window_s - now if on_their_way else 0.0

    def _urgency(self, queue: list[_Pending]) -> float:
        """A queue's effective deadline: its earliest, advanced by ``batch_credit_s`` per extra request."""
        return min(p.deadline for p in queue) - (len(queue) - 1) * self._batch_credit_s

    def _execute(self, key: _Key, batch: list[_Pending]) -> None:
        """Run ``batch`` as one GEMM; if that fails, run each request alone so only the culprit fails.

        Statistics count the GEMMs that ran: the batch's, or each successful request run alone.
        """
        start = time.perf_counter()
        try:
            outputs = self._run_batch(key[0], key[1], [p.request for p in batch])
            for pending, output in zip(batch, outputs, strict=True):
                pending.result = output
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:
                self._stats.record_split(key[0], key[1])
                for pending in batch:
                    self._run_alone(key, pending)
        else:
            self._record(key, batch, start)
        for pending in batch:
            pending.done = True

    def _run_alone(self, key: _Key, pending: _Pending) -> None:
        start = time.perf_counter()
        try:
            pending.result = self._run_batch(key[0], key[1], [pending.request])[0]
        except Exception as exc:
            pending.error = exc
        else:
            self._record(key, [pending], start)

    def _record(self, key: _Key, batch: list[_Pending], start: float) -> None:
        """Account one GEMM that served ``batch`` and began at ``start``."""
        requests = [p.request for p in batch]
        self._stats.record(
            key[0],
            key[1],
            waits=[start - p.arrival for p in batch],
            rows=sum(r.rows for r in requests),
            clients=len({r.client_id for r in requests}),
            compute_s=time.perf_counter() - start,
        )
