"""Opportunistic per-op batching by flat combining.

Every caller enqueues its request. Whoever finds the executor idle becomes the *combiner*: it takes
the most urgent queue (requests for one op and direction that agree on the product: compute dtype,
weight rounding, output features), runs all of its waiting requests as one GEMM, hands every result back and repeats until
its own request is done; then another waiter takes over. A lone
client therefore pays no thread hand-off, and concurrent clients meet in the same GEMM. Requests
may also be *submitted* without waiting (``submit``): their callback runs in whichever thread
computes them, so a server thread that hands a request over needs no second wake-up; a combiner
whose own request is done keeps combining while only submitted requests wait (no thread waits to
take over), and hands over as soon as a waiting caller could. Nothing
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

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..protocol import PRIORITY_INFERENCE, Direction, OpRequest
from .stats import BatchStats

log = logging.getLogger(__name__)

#: Runs one batch: (op name, direction, requests, where each output must be written or None) -> one
#: output per request, in order (the given destination itself where there is one).
BatchRunner = Callable[[str, Direction, Sequence[OpRequest], Sequence["torch.Tensor | None"]], list[torch.Tensor]]
#: Called once a submitted request is computed: (its output, None) or (None, the error it caused).
Completion = Callable[[torch.Tensor | None, BaseException | None], None]

#: ``OpRequest.batch_key()``: op, direction, and what the product is (dtypes, output features).
_Key = tuple
_Queues = dict[_Key, list["_Pending"]]

#: A client idle this long (no request queued, no answer received) no longer holds back a filling batch.
ACTIVE_WINDOW_S = 0.25


@dataclass(eq=False, slots=True)
class _Pending:
    request: OpRequest
    arrival: float
    deadline: float
    out: torch.Tensor | None = None
    on_done: Completion | None = None  # None: a caller waits in ``run``
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
        self._waiting = [0] * len(self._queues)  # queued requests whose callers wait in run(), per lane
        self._last_seen: list[dict[str, float]] = [{} for _ in self._queues]  # client -> its latest request or answer, per lane
        self._closed = False

    def run(self, request: OpRequest, out: torch.Tensor | None = None) -> torch.Tensor:
        """Execute ``request`` (batched with whatever else is waiting) and return its output
        (``out`` itself when given: the output is written there)."""
        pending, lane = self._pending(request, out, None)
        with self._cond:
            self._enqueue(lane, pending)
            self._waiting[lane] += 1
            while not pending.done:
                if self._busy[lane]:
                    self._cond.wait()
                else:
                    self._combine(lane, pending)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def submit(self, request: OpRequest, on_done: Completion, out: torch.Tensor | None = None) -> None:
        """Queue ``request`` and return; ``on_done`` gets its output (``out`` when given) or error.

        The calling thread computes batches itself when the executor is idle (so ``on_done`` may
        run before this returns), otherwise the running combiner computes the request.
        """
        pending, lane = self._pending(request, out, on_done)
        with self._cond:
            self._enqueue(lane, pending)
            if not self._busy[lane]:
                self._combine(lane, pending)

    def queue_depth(self) -> int:
        """Requests waiting right now (not counting the batch being computed)."""
        with self._cond:
            return sum(len(queue) for queues in self._queues for queue in queues.values())

    def close(self) -> None:
        """Refuse new requests; requests already queued still complete."""
        with self._cond:
            self._closed = True

    def _pending(self, request: OpRequest, out: torch.Tensor | None, on_done: Completion | None) -> tuple[_Pending, int]:
        now = time.perf_counter()
        lane = 1 if self._inference_lane and request.priority > PRIORITY_INFERENCE else 0
        return _Pending(request, now, now + max(request.priority, 0) * self._aging_s, out, on_done), lane

    def _enqueue(self, lane: int, pending: _Pending) -> None:
        """Queue ``pending`` in ``lane``. Called with the lock held."""
        if self._closed:
            raise RuntimeError("the executor is closed")
        request = pending.request
        key = request.batch_key()
        queue = self._queues[lane].get(key)
        if queue is None:
            self._queues[lane][key] = [pending]
        else:
            queue.append(pending)
        if self._max_wait_s > 0:
            self._last_seen[lane][request.client_id] = pending.arrival
            self._cond.notify_all()  # a combiner waiting for its batch to fill re-checks it

    def _combine(self, lane: int, own: _Pending) -> None:
        """Compute the lane's batches until ``own`` is done and a waiting caller can take over, or
        nothing is queued. Called with the lock held and the lane idle.

        Waiters are woken only when one exists: a caller in ``run`` whose request was in the batch
        or who could take over (a lone channel thread that computes its own requests wakes no one).
        """
        self._busy[lane] = True
        try:
            while self._queues[lane] and not (own.done and self._waiting[lane]):
                key, batch = self._take_batch(lane)
                callers = sum(p.on_done is None for p in batch) if len(batch) > 1 else batch[0].on_done is None
                self._waiting[lane] -= callers
                self._cond.release()
                try:
                    self._execute(key, batch)
                finally:
                    self._cond.acquire()
                if self._max_wait_s > 0:  # an answered client stays active for a while
                    now = time.perf_counter()
                    for pending in batch:
                        self._last_seen[lane][pending.request.client_id] = now
                    self._cond.notify_all()  # a filling batch re-checks who is on the way
                elif callers or self._waiting[lane]:
                    self._cond.notify_all()  # callers whose requests are done, or who may take over
        finally:
            self._busy[lane] = False
            if self._waiting[lane] or self._max_wait_s > 0:
                self._cond.notify_all()

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
        """Run ``batch`` as one GEMM; if that fails, run each request alone so only the culprit fails;
        then complete every request.

        Statistics count the GEMMs that ran: the batch's, or each successful request run alone.
        """
        if not self._run(key, batch) and len(batch) > 1:
            self._stats.record_split(key[0], key[1])
            for pending in batch:
                pending.error = None
                self._run(key, [pending])
        for pending in batch:
            pending.done = True
            if pending.on_done is not None:
                try:
                    pending.on_done(pending.result, pending.error)
                except Exception:  # a completion must never stop the combiner
                    log.exception("completion of a request to %s failed", key[0])

    def _run(self, key: _Key, batch: list[_Pending]) -> bool:
        """Compute ``batch`` in one GEMM and account it; False (each request's error set) if it failed."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            outputs = self._run_batch(key[0], key[1], [p.request for p in batch], [p.out for p in batch])
        except Exception as exc:
            for pending in batch:
                pending.error = exc
            return False
        compute_s, cpu_s = time.perf_counter() - start, time.thread_time() - cpu_start
        for pending, output in zip(batch, outputs, strict=True):
            pending.result = output
        self._stats.record(
            key[0],
            key[1],
            waits=[start - p.arrival for p in batch],
            rows=sum(p.request.rows for p in batch),
            clients=len({p.request.client_id for p in batch}) if len(batch) > 1 else 1,
            compute_s=compute_s,
            cpu_s=cpu_s,
        )
        return True
