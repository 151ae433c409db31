"""Threads that compute for the executor use its intra-op thread count, not the libraries' defaults,
and a thread with a count of its own (the serving engine's) gets it back after each product."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from symbiosis import BaseExecutor
from symbiosis.executor.executor import set_own_thread_count
from symbiosis.protocol import Direction, OpRequest

OP = "model.layers.0.self_attn.o_proj"


@pytest.fixture
def torch_threads() -> Iterator[Callable[[int], None]]:
    """``torch.set_num_threads``, with the count before the test restored after it."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def _in_new_thread(target: Callable[[], None]) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    library = next(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"), None)
    return None if library is None else ctypes.CDLL(str(library))


def test_a_new_thread_computes_with_torchs_thread_count(model_dir, torch_threads):
    """With ``torch.set_num_threads(1)``, a GEMM in a thread Python started (a server's channel
    thread) starts no OpenMP team of its own: MKL would otherwise use one thread per core there."""
    request = OpRequest(OP, Direction.FORWARD, torch.randn(256, 64))
    torch_threads(1)
    executor = BaseExecutor.from_pretrained(model_dir("llama"))
    counts: list[int] = []

    def compute() -> None:
        counts.append(_threads())
        for _ in range(3):
            executor.run(request)
        counts.append(_threads())  # while this thread lives, so does any team it started

    _in_new_thread(compute)
    assert counts[0] == counts[1], f"the computing thread started {counts[1] - counts[0]} OpenMP workers"


def test_a_thread_keeps_its_own_count_around_products(model_dir, monkeypatch, torch_threads):
    """The engine's thread runs its own code on one thread and the executor's products with the
    executor's count, switched around each product (read per thread from OpenMP, unlike
    ``torch.get_num_threads()``)."""
    openmp = _openmp()
    if openmp is None:
        pytest.skip("torch is not built with libgomp")
    torch_threads(2)
    executor = BaseExecutor.from_pretrained(model_dir("llama"))
    inside: list[int] = []
    compute = executor._compute
    monkeypatch.setattr(executor, "_compute", lambda *args: inside.append(openmp.omp_get_max_threads()) or compute(*args))
    seen: list[int] = []

    def engine() -> None:
        set_own_thread_count(1)
        seen.append(openmp.omp_get_max_threads())
        executor.run(OpRequest(OP, Direction.FORWARD, torch.randn(4, 64)))
        seen.append(openmp.omp_get_max_threads())

    _in_new_thread(engine)
    assert executor.threads == 2
    assert inside == [2] and seen == [1, 1]
