"""Client processes for the multi-process tests (started with the ``spawn`` method)."""

from __future__ import annotations

import threading

import torch

from symbiosis import load_model
from symbiosis.transport import MeteredTransport, connect


def forward_client(url: str, client_id: str, barrier, rounds: int, results) -> None:
    """Wait for the others, run ``rounds`` forward passes, report how many requests were answered."""
    transport = MeteredTransport(connect(url))
    model = load_model(transport, client_id=client_id)
    ids = torch.arange(3, 11).reshape(1, 8)
    barrier.wait()
    with torch.no_grad():
        for _ in range(rounds):
            model(input_ids=ids)
    results.put((client_id, transport.completed, transport.failed))


def stuck_client(url: str, shared_memory: bool) -> None:
    """Send one request and block in it (the test kills this process meanwhile)."""
    model = load_model(url, connect_options={"shared_memory": shared_memory})
    model(input_ids=torch.tensor([[1, 2, 3]]))


def idle_client(url: str, ready) -> None:
    """Open a gRPC session with one request, report ready, then hold the session idle (the test
    stops or kills this process)."""
    model = load_model(url, connect_options={"shared_memory": False})
    model(input_ids=torch.tensor([[1, 2, 3]]))
    ready.set()
    threading.Event().wait()
