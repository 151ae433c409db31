"""Threads that compute for the executor use torch's intra-op thread count, not the libraries' defaults."""

from __future__ import annotations

import os
import threading

import torch

from symbiosis import BaseExecutor
from symbiosis.protocol import Direction, OpRequest

OP = "model.layers.0.self_attn.o_proj"


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_a_new_thread_computes_with_torchs_thread_count(model_dir):
    """With ``torch.set_num_threads(1)``, a GEMM in a thread Python started (a server's channel
    thread) starts no OpenMP team of its own: MKL would otherwise use one thread per core there."""
    executor = BaseExecutor.from_pretrained(model_dir("llama"))
    request = OpRequest(OP, Direction.FORWARD, torch.randn(256, 64))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    counts: list[int] = []

    def compute() -> None:
        counts.append(_threads())
        for _ in range(3):
            executor.run(request)
        counts.append(_threads())  # while this thread lives, so does any team it started

    try:
        thread = threading.Thread(target=compute)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(previous)
    assert counts[0] == counts[1], f"the computing thread started {counts[1] - counts[0]} OpenMP workers"
