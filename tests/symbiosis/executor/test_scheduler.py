"""The batching scheduler: requests for the same op meet in one GEMM, urgency and fairness hold."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from symbiosis.executor.scheduler import BatchScheduler
from symbiosis.executor.stats import BatchStats
from symbiosis.protocol import PRIORITY_INFERENCE, PRIORITY_TRAINING, Direction, OpRequest


class Recorder:
    """A batch runner that records every batch (op, direction, client ids); the first batch can be held."""

    def __init__(self, hold_first: bool = True) -> None:
        self.batches: list[tuple[str, Direction, list[str]]] = []
        self.release = threading.Event()
        self.holding = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, op, direction, requests, outs):
        if not self.holding.is_set():  # only the first batch is held
            self.holding.set()
            self.release.wait(10)
        self.batches.append((op, direction, [r.client_id for r in requests]))
        if any(r.client_id.startswith("poison") for r in requests):
            raise RuntimeError("poisoned batch")
        return [r.x * 2 for r in requests]


def submit(scheduler, results, op, client, priority=PRIORITY_TRAINING, rows=1, direction=Direction.FORWARD):
    def run():
        try:
            results[client] = scheduler.run(OpRequest(op, direction, torch.ones(rows, 2), client_id=client, priority=priority))
        except Exception as exc:
            results[client] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_queued(scheduler, n):
    deadline = time.monotonic() + 10
    while scheduler.queue_depth() < n:
        assert time.monotonic() < deadline, "requests never queued"
        time.sleep(0.001)


def hold_then(scheduler, recorder, results, queue, blocker_priority=PRIORITY_TRAINING):
    """Block the executor (the lane of ``blocker_priority``) with one request, queue ``queue`` (list of
    submit kwargs) in order, release."""
    threads = [submit(scheduler, results, "blocker", "blocker", priority=blocker_priority)]
    assert recorder.holding.wait(10)
    for i, kwargs in enumerate(queue):
        threads.append(submit(scheduler, results, **kwargs))
        wait_queued(scheduler, i + 1)
    recorder.release.set()
    for thread in threads:
        thread.join(10)
    return recorder.batches[1:]


def test_requests_waiting_for_the_same_op_share_one_batch():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats())
    batches = hold_then(scheduler, recorder, results, [dict(op="q", client=f"c{i}") for i in range(4)])
    assert batches == [("q", Direction.FORWARD, ["c0", "c1", "c2", "c3"])]
    assert all(torch.equal(results[f"c{i}"], torch.full((1, 2), 2.0)) for i in range(4))


def test_directions_and_ops_never_mix():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats())
    batches = hold_then(
        scheduler,
        recorder,
        results,
        [dict(op="q", client="a"), dict(op="k", client="b"), dict(op="q", client="c", direction=Direction.BACKWARD)],
    )
    assert sorted((op, d, tuple(c)) for op, d, c in batches) == [
        ("k", Direction.FORWARD, ("b",)),
        ("q", Direction.FORWARD, ("a",)),
        ("q", Direction.BACKWARD, ("c",)),
    ]


def test_inference_never_waits_behind_a_finetuning_gemm():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats())
    blocker = submit(scheduler, results, "train_op", "trainer", priority=PRIORITY_TRAINING)
    assert recorder.holding.wait(10)  # a fine-tuning GEMM is running
    submit(scheduler, results, "infer_op", "user", priority=PRIORITY_INFERENCE).join(10)
    assert torch.equal(results["user"], torch.full((1, 2), 2.0)) and "trainer" not in results
    recorder.release.set()
    blocker.join(10)
    assert [op for op, _, _ in recorder.batches] == ["infer_op", "train_op"]


def test_inference_requests_batch_in_their_lane():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats())
    batches = hold_then(scheduler, recorder, results, [dict(op="q", client=f"u{i}", priority=PRIORITY_INFERENCE) for i in range(3)],
                        blocker_priority=PRIORITY_INFERENCE)
    assert batches == [("q", Direction.FORWARD, ["u0", "u1", "u2"])]


def test_one_lane_puts_inference_ahead_of_earlier_finetuning():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats(), aging_s=10.0, inference_lane=False)
    batches = hold_then(
        scheduler,
        recorder,
        results,
        [dict(op="train_op", client="trainer", priority=PRIORITY_TRAINING), dict(op="infer_op", client="user", priority=PRIORITY_INFERENCE)],
    )
    assert [op for op, _, _ in batches] == ["infer_op", "train_op"]


def test_lower_priority_that_waited_longer_than_aging_goes_first():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats(), aging_s=0.05)
    threads = [submit(scheduler, results, "blocker", "blocker")]
    assert recorder.holding.wait(10)
    threads.append(submit(scheduler, results, "low_op", "low", priority=3))  # deadline: arrival + 0.15 s
    wait_queued(scheduler, 1)
    time.sleep(0.25)
    threads.append(submit(scheduler, results, "train_op", "trainer", priority=PRIORITY_TRAINING))  # deadline: now + 0.05 s
    wait_queued(scheduler, 2)
    recorder.release.set()
    for thread in threads:
        thread.join(10)
    assert [op for op, _, _ in recorder.batches[1:]] == ["low_op", "train_op"]


def test_more_waiting_requests_make_an_op_more_urgent():
    def order(batch_credit_s: float) -> list[str]:
        recorder, results = Recorder(), {}
        scheduler = BatchScheduler(recorder, BatchStats(), aging_s=10.0, batch_credit_s=batch_credit_s)
        queue = [dict(op="lone", client="a")] + [dict(op="crowd", client=f"c{i}") for i in range(3)]
        return [op for op, _, _ in hold_then(scheduler, recorder, results, queue)]

    assert order(batch_credit_s=60.0) == ["crowd", "lone"]
    assert order(batch_credit_s=0.0) == ["lone", "crowd"]


def test_one_lane_lets_finetuning_that_waited_longer_than_aging_go_first():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats(), aging_s=0.05, inference_lane=False)
    threads = [submit(scheduler, results, "blocker", "blocker")]
    assert recorder.holding.wait(10)
    threads.append(submit(scheduler, results, "train_op", "trainer", priority=PRIORITY_TRAINING))
    wait_queued(scheduler, 1)
    time.sleep(0.1)  # the training request now waited longer than aging_s
    threads.append(submit(scheduler, results, "infer_op", "user", priority=PRIORITY_INFERENCE))
    wait_queued(scheduler, 2)
    recorder.release.set()
    for thread in threads:
        thread.join(10)
    assert [op for op, _, _ in recorder.batches[1:]] == ["train_op", "infer_op"]


def test_max_rows_splits_a_queue_by_urgency():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats(), max_rows=4, aging_s=10.0, inference_lane=False)
    batches = hold_then(
        scheduler,
        recorder,
        results,
        [
            dict(op="q", client="t1", rows=3, priority=PRIORITY_TRAINING),
            dict(op="q", client="i1", rows=2, priority=PRIORITY_INFERENCE),
            dict(op="q", client="i2", rows=2, priority=PRIORITY_INFERENCE),
        ],
    )
    assert [clients for _, _, clients in batches] == [["i1", "i2"], ["t1"]]


def warm_up(scheduler, results, *clients):
    """Each client sends one request, in turn: they are now active clients of the training lane."""
    for client in clients:
        submit(scheduler, results, "warm", client).join(10)


def test_max_wait_lets_a_batch_fill_with_an_active_client():
    recorder, results = Recorder(hold_first=False), {}
    scheduler = BatchScheduler(recorder, BatchStats(), max_wait_s=0.5)
    warm_up(scheduler, results, "a", "b")
    threads = [submit(scheduler, results, "q", "a")]
    time.sleep(0.05)
    threads.append(submit(scheduler, results, "q", "b"))
    for thread in threads:
        thread.join(10)
    assert [clients for op, _, clients in recorder.batches if op == "q"] == [["a", "b"]]


def test_a_lone_client_never_waits_for_a_batch():
    recorder, results = Recorder(hold_first=False), {}
    scheduler = BatchScheduler(recorder, BatchStats(), max_wait_s=60.0)
    for _ in range(3):
        thread = submit(scheduler, results, "q", "a")
        thread.join(30)  # well before max_wait_s runs out
        assert not thread.is_alive(), "a lone client waited for a batch to fill"


def test_a_batch_stops_waiting_when_every_active_client_is_queued_elsewhere():
    """b waits for op r, so it cannot join a's batch of op q: neither waits out max_wait_s."""
    recorder, results = Recorder(hold_first=False), {}
    scheduler = BatchScheduler(recorder, BatchStats(), max_wait_s=60.0)
    warm_up(scheduler, results, "a", "b")
    threads = [submit(scheduler, results, "q", "a"), submit(scheduler, results, "r", "b")]
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a batch waited for a client queued on another op"
    assert sorted(clients for op, _, clients in recorder.batches if op in "qr") == [["a"], ["b"]]


def test_a_client_idle_past_the_active_window_holds_no_batch():
    recorder, results = Recorder(hold_first=False), {}
    scheduler = BatchScheduler(recorder, BatchStats(), max_wait_s=60.0, active_window_s=0.05)
    warm_up(scheduler, results, "gone", "a")
    time.sleep(0.1)
    thread = submit(scheduler, results, "q", "a")
    thread.join(30)
    assert not thread.is_alive(), "a batch waited for a client that had gone idle"


def test_a_batch_that_reaches_max_rows_stops_waiting():
    recorder, results = Recorder(hold_first=False), {}
    scheduler = BatchScheduler(recorder, BatchStats(), max_wait_s=60.0, max_rows=2)
    warm_up(scheduler, results, "a", "b")
    threads = [submit(scheduler, results, "q", "a")]
    wait_queued(scheduler, 1)
    threads.append(submit(scheduler, results, "q", "b"))
    for thread in threads:
        thread.join(30)  # well before max_wait_s runs out
    assert not any(thread.is_alive() for thread in threads), "a full batch waited for max_wait_s"
    assert [clients for op, _, clients in recorder.batches if op == "q"] == [["a", "b"]]


def test_without_max_wait_nothing_waits_for_a_batch():
    recorder, results = Recorder(hold_first=False), {}
    scheduler = BatchScheduler(recorder, BatchStats())
    submit(scheduler, results, "q", "a").join(10)
    submit(scheduler, results, "q", "b").join(10)
    assert [clients for _, _, clients in recorder.batches] == [["a"], ["b"]]


def test_a_failing_request_fails_alone():
    recorder, results = Recorder(), {}
    scheduler = BatchScheduler(recorder, BatchStats())
    hold_then(scheduler, recorder, results, [dict(op="q", client="good1"), dict(op="q", client="poison"), dict(op="q", client="good2")])
    assert isinstance(results["poison"], RuntimeError)
    assert torch.equal(results["good1"], torch.full((1, 2), 2.0))
    assert torch.equal(results["good2"], torch.full((1, 2), 2.0))


def test_statistics_count_the_gemms_that_ran_when_a_batch_is_split():
    """A failed batch is no GEMM; its requests re-run alone count one GEMM each, if they succeed."""
    recorder, results, stats = Recorder(), {}, BatchStats()
    scheduler = BatchScheduler(recorder, stats)
    batches = hold_then(scheduler, recorder, results, [dict(op="q", client="good1"), dict(op="q", client="poison"), dict(op="q", client="good2")])
    assert [clients for _, _, clients in batches] == [["good1", "poison", "good2"], ["good1"], ["poison"], ["good2"]]
    summary = {op: s for (op, _), s in stats.by_family().items()}["q"]
    assert (summary["gemms"], summary["requests"], summary["rows"], summary["split_batches"]) == (2, 2, 2, 1)
    assert summary["shared_gemm_fraction"] == 0


def test_a_failing_lone_request_runs_once():
    recorder, results, stats = Recorder(hold_first=False), {}, BatchStats()
    submit(BatchScheduler(recorder, stats), results, "q", "poison").join(10)
    assert isinstance(results["poison"], RuntimeError)
    assert len(recorder.batches) == 1
    assert stats.total()["gemms"] == 0 and stats.total()["split_batches"] == 0


def test_statistics_count_requests_rows_and_clients():
    recorder, results, stats = Recorder(), {}, BatchStats()
    scheduler = BatchScheduler(recorder, stats)
    hold_then(scheduler, recorder, results, [dict(op="q", client="a", rows=2), dict(op="q", client="b", rows=3), dict(op="q", client="b", rows=1)])
    summary = {op: s for (op, _), s in stats.by_family().items()}["q"]
    assert summary["gemms"] == 1
    assert summary["requests"] == 3
    assert summary["rows"] == 6
    assert summary["clients_per_gemm"] == 2
    assert summary["shared_gemm_fraction"] == 1.0
    assert summary["wait_ms_max"] > 0


def test_closed_scheduler_refuses_new_requests():
    scheduler = BatchScheduler(Recorder(hold_first=False), BatchStats())
    scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.run(OpRequest("q", Direction.FORWARD, torch.ones(1, 2)))


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        BatchScheduler(Recorder(), BatchStats(), max_rows=0)
    with pytest.raises(ValueError):
        BatchScheduler(Recorder(), BatchStats(), aging_s=-1)
    with pytest.raises(ValueError):
        BatchScheduler(Recorder(), BatchStats(), batch_credit_s=-1)
    with pytest.raises(ValueError, match="active_window_s"):
        BatchScheduler(Recorder(), BatchStats(), active_window_s=-1)
