"""A base found through a directory: failover to a live replica, refusal of a stale address, moves
on renewal — with executor servers in this process and a directory whose answers the test sets."""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch

from symbiosis import BaseExecutor
from symbiosis.errors import ExecutorUnavailableError
from symbiosis.protocol import Direction, OpRequest
from symbiosis.server import ExecutorServer
from symbiosis.tiny import save_random_model, tiny_config
from symbiosis.transport import connect
from symbiosis.transport.fingerprint import fingerprint_of
from symbiosis.transport.replicated import Endpoint, ReplicatedTransport

OP = "model.layers.0.self_attn.o_proj"


class Directory:
    """Answers with the first of ``addresses`` not avoided (all avoided: the first); counts questions."""

    def __init__(self, addresses: list[str], fingerprint: str) -> None:
        self.addresses, self.fingerprint = addresses, fingerprint
        self.questions, self.released = 0, []
        self._lock = threading.Lock()

    def assign(self, client, current, avoid, lease_s):
        with self._lock:
            self.questions += 1
            usable = [a for a in self.addresses if a not in avoid] or self.addresses
            if not usable:
                raise ExecutorUnavailableError("no replica")
            return [Endpoint(0, self.addresses.index(usable[0]), usable[0], self.fingerprint)]

    def release(self, client):
        self.released.append(client)


@pytest.fixture
def replicas(model_dir):
    servers = [ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama"))).start() for _ in range(2)]
    yield servers
    for server in servers:
        server.stop(0.5)


def open_endpoint(address: str):
    return connect(address, shared_memory=False, retry_timeout_s=0.2)


def forward(transport, x):
    return transport.run(OpRequest(OP, Direction.FORWARD, x))


def test_a_call_fails_over_to_another_replica(replicas):
    executor = replicas[0].executor
    directory = Directory([s.url for s in replicas], fingerprint_of(executor, executor.spec()))
    transport = ReplicatedTransport(directory, open_endpoint, retry_timeout_s=30, refresh_s=60)
    x = torch.randn(3, 64)
    expected = executor.run(OpRequest(OP, Direction.FORWARD, x))
    assert torch.equal(forward(transport, x), expected) and transport.endpoints[0].address == replicas[0].url
    replicas[0].stop(0.5)  # replica 0 goes away between two calls of the client
    assert torch.equal(forward(transport, x), expected)
    assert transport.endpoints[0].address == replicas[1].url and transport.failovers >= 1
    transport.close()
    assert directory.released == [transport.client_id]


def test_a_stale_address_with_other_weights_is_refused(replicas, tmp_path):
    """The directory still lists an address that another server (other weights) now listens on:
    the client never sends it op calls; it reports the replica unavailable after retrying."""
    other = save_random_model(tiny_config("llama"), tmp_path / "other", seed=1)
    stranger = ExecutorServer(BaseExecutor.from_pretrained(other)).start()
    try:
        executor = replicas[0].executor
        directory = Directory([stranger.url], fingerprint_of(executor, executor.spec()))
        with pytest.raises(ExecutorUnavailableError, match="serves other weights or layers"):
            ReplicatedTransport(directory, open_endpoint, retry_timeout_s=1.0, refresh_s=60)
        assert directory.questions > 1  # retried, then gave up
        assert stranger.executor.stats.total()["requests"] == 0
    finally:
        stranger.stop(0.5)


def test_renewals_follow_the_directory(replicas):
    """The directory moves the client (a rebalance): its next renewal switches replicas while calls go on."""
    executor = replicas[0].executor
    directory = Directory([s.url for s in replicas], fingerprint_of(executor, executor.spec()))
    transport = ReplicatedTransport(directory, open_endpoint, retry_timeout_s=30, refresh_s=0.1)
    x = torch.randn(2, 64)
    forward(transport, x)
    directory.addresses = directory.addresses[::-1]
    deadline = time.monotonic() + 30
    while transport.endpoints[0].address != replicas[1].url and time.monotonic() < deadline:
        forward(transport, x)
    assert transport.endpoints[0].address == replicas[1].url
    before = replicas[1].executor.stats.total()["requests"]
    forward(transport, x)
    assert replicas[1].executor.stats.total()["requests"] == before + 1
    transport.close()


def test_every_shard_is_checked_like_a_sharded_base(model_dir):
    """Endpoints of one shard per layer range are routed like ``load_model([...])``; the open options
    (token, retries) reach every connection."""
    path = model_dir("llama", num_hidden_layers=3)
    servers = [ExecutorServer(BaseExecutor.from_pretrained(path, layers=r)).start() for r in ((0, 1), (1, 3))]
    try:
        fp = fingerprint_of(servers[0].executor, servers[0].executor.spec())

        class Sharded(Directory):
            def assign(self, client, current, avoid, lease_s):
                return [Endpoint(i, 0, s.url, fp, r) for i, (s, r) in enumerate(zip(servers, ((0, 1), (1, 3))))]

        opened = []
        transport = ReplicatedTransport(Sharded([], fp), functools.partial(lambda a, **o: opened.append(o) or connect(a, **o), retry_timeout_s=0.3), refresh_s=60)
        assert transport.spec().layer_range is None and len(transport.spec().ops) == sum(len(s.executor.spec().ops) for s in servers)
        forward(transport, torch.randn(1, 64))
        assert servers[0].executor.stats.total()["requests"] == 1 and servers[1].executor.stats.total()["requests"] == 0
        assert opened == [{"retry_timeout_s": 0.3}] * 2
        transport.close()
    finally:
        for server in servers:
            server.stop(0.5)
