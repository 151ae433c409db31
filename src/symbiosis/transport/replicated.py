"""A base found through a directory: shards served by replicas that start, move, restart and go.

A ``Directory`` (for Ray deployments, ``transport.ray_directory.RayDirectory``) tells a client
which replica of each shard to use — an ``Endpoint``: the executor server's address and its weight
fingerprint. The client then talks to those servers directly, exactly as to servers given by
address (per-op tensors never pass through the directory), and routes each op to its shard
(``ShardedTransport``, which also checks that the shards tile the model and hold one base).

Replica policy: a client sticks to one replica per shard, the one the directory assigns; the
directory balances clients over the ready replicas (see ``symbiosis.ray.registry``). The client
renews its assignment every ``refresh_s`` seconds, so replicas added later get their share of
clients and replicas being removed lose theirs, while a client's lanes (gRPC streams, same-host
shared-memory channels) stay put between changes.

Failover: a call that finds its server unreachable (the server's own retries, ``failover_s``, are
exhausted) asks the directory again, avoiding that address, and is retried on what it gets — a
restarted replica's new address, or another replica — with backoff for up to ``retry_timeout_s``.
Op calls are stateless, so a retried call is the same call: a training loop loses and repeats no
optimizer step, and generation goes on where it was (the KV cache is the client's).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import tenacity
import torch

from ..errors import ExecutorUnavailableError
from ..protocol import ModelSpec, OpRequest
from .base import Transport
from .fingerprint import fingerprint_of
from .sharded import ShardedTransport

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds an unreachable address is avoided when the directory offers another replica.
AVOID_S = 30.0
#: Seconds a replaced connection is kept open for calls still running on it before it is closed.
RETIRE_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    """Replica ``replica`` of shard ``shard`` (layers ``layers``; None: the whole model): its
    server's address and weight fingerprint."""

    shard: int
    replica: int
    address: str
    fingerprint: str
    layers: tuple[int, int] | None = None


class Directory(Protocol):
    """Where a client learns which replica of each shard to use."""

    def assign(self, client: str, current: Sequence[Endpoint], avoid: Collection[str], lease_s: float) -> list[Endpoint]:
        """One endpoint per shard, in shard order, for ``client`` (which now uses ``current``),
        avoiding the addresses in ``avoid`` where another replica is ready; the assignment holds
        for ``lease_s`` seconds unless renewed. Raises ``ExecutorUnavailableError`` while a shard
        has no ready replica (the caller retries), another error if it never will."""
        ...

    def release(self, client: str) -> None:
        """``client`` is gone: its assignment no longer counts."""
        ...


class ReplicatedTransport:
    """``Transport`` to the replicas ``directory`` assigns; ``open_endpoint(address)`` connects to
    one server (a ``RemoteTransport`` that retries for only a short while).

    ``retry_timeout_s``: how long a call is retried while its shard has no reachable replica.
    ``refresh_s``: how often the assignment is renewed (and rebalanced).
    """

    def __init__(
        self,
        directory: Directory,
        open_endpoint: Callable[[str], Transport],
        *,
        retry_timeout_s: float = 60.0,
        refresh_s: float = 5.0,
    ) -> None:
        self.directory = directory
        self.client_id = uuid.uuid4().hex
        self.failovers = 0
        self._open_endpoint = open_endpoint
        self._lease_s = max(10.0, 4 * refresh_s)
        self._lock = threading.RLock()
        self._connections: dict[str, Transport] = {}
        self._retired: list[tuple[float, Transport]] = []
        self._avoid: dict[str, float] = {}
        self._endpoints: list[Endpoint] = []
        self._route: ShardedTransport | None = None
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(ExecutorUnavailableError),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0) + tenacity.wait_random(0, 0.1),
            stop=tenacity.stop_after_delay(retry_timeout_s),
            reraise=True,
        )
        self._retrying.copy()(self._reassign)
        self._spec = self._route.spec()
        self._fingerprint = self._endpoints[0].fingerprint
        self._stop = threading.Event()
        self._finalizer = weakref.finalize(self, _release, directory, self.client_id, self._stop)
        threading.Thread(target=_refresh, args=(weakref.ref(self), self._stop, refresh_s), name="symbiosis-refresh", daemon=True).start()

    # ------------------------------------------------------------------------- Transport API
    def spec(self) -> ModelSpec:
        return self._spec

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        return self._call(lambda route: route.tensors(names), None)

    def run(self, request: OpRequest) -> torch.Tensor:
        return self._call(lambda route: route.run(request), request.op)

    # ------------------------------------------------------------------------------- extras
    def fingerprint(self) -> str:
        """The fingerprint of the base's weights (every replica of every shard has it)."""
        return self._fingerprint

    @property
    def endpoints(self) -> list[Endpoint]:
        """The replicas this client uses now, one per shard."""
        return list(self._endpoints)

    def stats(self) -> dict[str, Any]:
        """Each server's statistics as ``RemoteTransport.stats`` gives them, by address."""
        return {e.address: self._connections[e.address].stats() for e in self._endpoints}

    def close(self) -> None:
        """Stop renewing, give up the assignment and close every connection."""
        self._finalizer()
        with self._lock:
            for transport in [*self._connections.values(), *(t for _, t in self._retired)]:
                _close(transport)
            self._connections.clear()
            self._retired.clear()

    def __repr__(self) -> str:
        return f"ReplicatedTransport({self.directory!r})"

    # ------------------------------------------------------------------------------ internals
    def _call(self, fn: Callable[[ShardedTransport], T], op: str | None) -> T:
        route = self._route
        try:
            return fn(route)
        except ExecutorUnavailableError as exc:
            log.info("executor of %s unreachable (%s); asking the directory again", op or "tensors", exc)
        failed = route
        for attempt in self._retrying.copy():
            with attempt:
                self._failover(failed, op)
                route = self._route
                try:
                    return fn(route)
                except ExecutorUnavailableError:
                    failed = route
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _failover(self, failed: ShardedTransport, op: str | None) -> None:
        """``failed`` could not serve ``op``: unless another thread has replaced it already, ask
        the directory for another assignment that avoids the unreachable server."""
        with self._lock:
            if self._route is not failed:
                return
            self.failovers += 1
            now = time.monotonic()
            owner = failed.owner_of(op) if op is not None else None
            for address, transport in list(self._connections.items()):
                if transport is owner:  # avoided, and reconnected afresh should it come back (maybe another server)
                    self._avoid[address] = now + AVOID_S
                    self._retired.append((now, self._connections.pop(address)))
            self._reassign()

    def _reassign(self) -> None:
        """Ask the directory for this client's endpoints; connect to new ones and switch to them."""
        with self._lock:
            now = time.monotonic()
            self._avoid = {a: until for a, until in self._avoid.items() if until > now}
            endpoints = self.directory.assign(self.client_id, self._endpoints, set(self._avoid), self._lease_s)
            if endpoints != self._endpoints:
                route = ShardedTransport([self._connect(e) for e in endpoints])
                if self._route is not None and route.spec().ops.keys() != self._spec.ops.keys():
                    raise ExecutorUnavailableError(f"the directory's replicas {endpoints} serve other ops than before")
                log.info("client %s now uses %s", self.client_id, [e.address for e in endpoints])
                self._route, self._endpoints = route, endpoints
            self._retire_unused(now)

    def _connect(self, endpoint: Endpoint) -> Transport:
        """The connection to ``endpoint``'s server, checked to hold the weights the directory says."""
        transport = self._connections.get(endpoint.address)
        if transport is None:
            transport = self._open_endpoint(endpoint.address)
            self._connections[endpoint.address] = transport
        spec = transport.spec()
        found = fingerprint_of(transport, spec)
        layers = tuple(spec.layer_range) if spec.layer_range else None
        if found != endpoint.fingerprint or (self._route is not None and found != self._fingerprint) or layers != endpoint.layers:
            # a stale address, now used by another server (a port reused after a restart)
            del self._connections[endpoint.address]
            _close(transport)
            raise ExecutorUnavailableError(
                f"{endpoint.address} serves other weights or layers ({found[:12]}, {layers}) than the directory says "
                f"({endpoint.fingerprint[:12]}, {endpoint.layers})"
            )
        return transport

    def _retire_unused(self, now: float) -> None:
        """Close connections no longer used, once calls that may still run on them have had time to end."""
        used = {e.address for e in self._endpoints}
        for address in [a for a in self._connections if a not in used]:
            self._retired.append((now, self._connections.pop(address)))
        keep = []
        for since, transport in self._retired:
            if now - since >= RETIRE_S:
                _close(transport)
            else:
                keep.append((since, transport))
        self._retired = keep


def _close(transport: Transport) -> None:
    close = getattr(transport, "close", None)
    if callable(close):
        close()


def _release(directory: Directory, client: str, stop: threading.Event) -> None:
    """Stop renewing ``client``'s assignment and give it up."""
    stop.set()
    try:
        directory.release(client)
    except Exception as exc:  # the directory may be gone already; the lease then expires
        log.debug("could not release %s: %s", client, exc)


def _refresh(ref: weakref.ref, stop: threading.Event, period_s: float) -> None:
    """Renew the assignment of ``ref()`` every ``period_s`` until ``stop`` is set or it is collected."""
    while not stop.wait(period_s):
        transport = ref()
        if transport is None:
            return
        try:
            transport._reassign()
        except Exception as exc:  # the next call (or renewal) tries again
            log.warning("could not renew the assignment of %s: %s", transport.client_id, exc)
        del transport
