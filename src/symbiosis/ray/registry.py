"""The registry: a detached, named Ray actor that knows every deployment's shards and replicas.

What it holds: per deployment, what was deployed (``spec``) and per replica of each shard its state
(``starting``, ``ready``, ``draining``), its server's address, weight fingerprint, node and process,
how often it started; and which replica each client uses (``assign``).

Who tells it: each shard actor reports itself when it starts (also after Ray restarted it, with
its new address) and when it drains; ``symbiosis.ray.deploy`` creates and deletes deployment
entries. The shard actors are the source of truth: when the registry itself is restarted by Ray,
it asks every shard actor to report again, and clients re-register their assignments with their
next renewal, so nothing is lost.

Assignment policy (sticky, least-loaded): a client keeps its replica of a shard while that replica
is ready, not among the addresses it reports unreachable, and does not hold more than its fair
share of the shard's clients (ceil(clients / ready replicas)); otherwise it moves to the ready
replica with the fewest clients (ties: a replica on the client's own node — same-host shared
memory — then the lowest replica number). Clients renew every few seconds, so replicas added while
clients run get their share and replicas being drained lose all of theirs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..transport.ray_directory import NAMESPACE, REGISTRY_NAME

log = logging.getLogger(__name__)

#: Prefix of shard actors' names: ``symbiosis-shard:<deployment>:<shard>:<replica>``.
SHARD_PREFIX = "symbiosis-shard:"
STATES = ("starting", "ready", "draining")


def shard_actor_name(deployment: str, shard: int, replica: int) -> str:
    return f"{SHARD_PREFIX}{deployment}:{shard}:{replica}"


@dataclass
class ReplicaRecord:
    """One replica of one shard as it last reported itself."""

    shard: int
    replica: int
    state: str
    address: str | None = None
    fingerprint: str | None = None
    node_id: str | None = None
    pid: int | None = None
    metrics_port: int | None = None
    starts: int = 0
    since: float = 0.0


@dataclass
class Lease:
    """A client's replica per shard, valid until ``expires`` (monotonic seconds) unless renewed."""

    replicas: list[int]
    expires: float


@dataclass
class DeploymentRecord:
    spec: dict[str, Any]
    replicas: dict[tuple[int, int], ReplicaRecord] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)

    @property
    def shards(self) -> int:
        return len(self.spec["layers"])

    def live_leases(self, now: float) -> dict[str, Lease]:
        self.leases = {client: lease for client, lease in self.leases.items() if lease.expires > now}
        return self.leases


class Registry:
    """The registry actor's state and methods (run as ``ray.remote(Registry)``, see ``start_registry``)."""

    def __init__(self) -> None:
        self._deployments: dict[str, DeploymentRecord] = {}
        self._deleted: set[str] = set()  # uids of deleted deployments: late reports from their actors are ignored
        self._ask_shards_to_report()

    # ------------------------------------------------------------------------------ deploying
    def create(self, spec: dict[str, Any]) -> str | None:
        """Record a new deployment; an error message if the name is taken."""
        name = spec["name"]
        if name in self._deployments:
            return f"a deployment named {name!r} exists already (symbiosis ray shutdown {name} first, or scale it)"
        self._deployments[name] = DeploymentRecord(spec)
        return None

    def update_spec(self, name: str, changes: dict[str, Any]) -> None:
        if name in self._deployments:
            self._deployments[name].spec.update(changes)

    def report(self, spec: dict[str, Any], shard: int, replica: int, info: dict[str, Any]) -> None:
        """A shard actor's state (called by the actor when it starts, becomes ready, drains or is asked)."""
        if spec["uid"] in self._deleted:
            return
        deployment = self._deployments.get(spec["name"])
        if deployment is None or deployment.spec["uid"] != spec["uid"]:
            deployment = self._deployments[spec["name"]] = DeploymentRecord(spec)  # after a registry restart
        previous = deployment.replicas.get((shard, replica))
        starts = max(1, (previous.starts if previous else 0) + (info["state"] == "starting"))
        deployment.replicas[(shard, replica)] = ReplicaRecord(shard=shard, replica=replica, starts=starts, **info)

    def remove(self, name: str, replica: int) -> None:
        """Forget replica ``replica`` of every shard (it was stopped)."""
        deployment = self._deployments.get(name)
        if deployment is not None:
            deployment.replicas = {key: r for key, r in deployment.replicas.items() if key[1] != replica}

    def delete(self, name: str) -> None:
        deployment = self._deployments.pop(name, None)
        if deployment is not None:
            self._deleted.add(deployment.spec["uid"])

    # -------------------------------------------------------------------------------- clients
    def assign(self, name: str, client: str, current: list[int], avoid: list[str], lease_s: float, node: str | None) -> dict[str, Any]:
        """``{"endpoints": [...]}`` (one per shard), or ``{"unavailable": why}`` while a shard has no
        ready replica, or ``{"unknown": why}`` for a deployment that does not exist."""
        deployment = self._deployments.get(name)
        if deployment is None:
            if shard_actor_names(name):
                return {"unavailable": f"the registry restarted and the shards of {name} have not reported again yet"}
            deployed = ", ".join(sorted(self._deployments)) or "none"
            return {"unknown": f"no Symbiosis deployment named {name!r} on this Ray cluster (deployed: {deployed})"}
        now = time.monotonic()
        others = {c: lease for c, lease in deployment.live_leases(now).items() if c != client}
        chosen = []
        for shard in range(deployment.shards):
            ready = [r for (s, _), r in sorted(deployment.replicas.items()) if s == shard and r.state == "ready"]
            if not ready:
                states = ", ".join(f"replica {r.replica}: {r.state}" for (s, _), r in sorted(deployment.replicas.items()) if s == shard)
                return {"unavailable": f"shard {shard} of {name} has no ready replica ({states or 'none started'})"}
            usable = [r for r in ready if r.address not in avoid] or ready
            load = Counter(lease.replicas[shard] for lease in others.values() if len(lease.replicas) > shard)
            fair = math.ceil((sum(load[r.replica] for r in usable) + 1) / len(usable))
            keep = next((r for r in usable if len(current) == deployment.shards and r.replica == current[shard]), None)
            if keep is None or load[keep.replica] + 1 > fair:
                keep = min(usable, key=lambda r: (load[r.replica], r.node_id != node, r.replica))
            chosen.append(keep)
        deployment.leases[client] = Lease([r.replica for r in chosen], now + lease_s)
        layers = deployment.spec["layers"] if deployment.shards > 1 else [None]
        return {"endpoints": [dict(shard=r.shard, replica=r.replica, address=r.address, fingerprint=r.fingerprint, layers=layers[r.shard]) for r in chosen]}

    def release(self, name: str, client: str) -> None:
        deployment = self._deployments.get(name)
        if deployment is not None:
            deployment.leases.pop(client, None)

    # ---------------------------------------------------------------------------------- views
    def describe(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every deployment (or only ``name``): its spec and each shard's replicas with their clients."""
        now = time.monotonic()
        out = []
        for dep_name, deployment in sorted(self._deployments.items()):
            if name is not None and dep_name != name:
                continue
            clients = Counter((shard, replica) for lease in deployment.live_leases(now).values() for shard, replica in enumerate(lease.replicas))
            shards = []
            for shard, layers in enumerate(deployment.spec["layers"]):
                replicas = [
                    {**asdict(r), "clients": clients[(shard, r.replica)]} for (s, _), r in sorted(deployment.replicas.items()) if s == shard
                ]
                shards.append({"shard": shard, "layers": layers, "replicas": replicas})
            out.append({"name": dep_name, "spec": deployment.spec, "shards": shards})
        return out

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------------------ internals
    def _ask_shards_to_report(self) -> None:
        """Every shard actor there is reports itself (asynchronously): after a restart of this
        actor, that rebuilds what it knew."""
        import ray

        for name in shard_actor_names():
            try:
                ray.get_actor(name, namespace=NAMESPACE).announce.remote()
            except ValueError:  # gone meanwhile
                continue


def shard_actor_names(deployment: str | None = None) -> list[str]:
    """Names of the shard actors Ray knows (of ``deployment`` only, if given); none outside Ray."""
    import ray

    if not ray.is_initialized():  # a Registry outside Ray (unit tests)
        return []
    prefix = SHARD_PREFIX if deployment is None else f"{SHARD_PREFIX}{deployment}:"
    return [e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == NAMESPACE and e["name"].startswith(prefix)]


#: The resource Ray gives the head node (one unit): the registry asks for a sliver of it.
HEAD_RESOURCE = "node:__internal_head__"


def start_registry() -> Any:
    """The registry actor, started (detached, restarted by Ray whenever it dies) if it is not running.

    It runs on the head node, which a cluster cannot lose and keep running (the GCS lives there), so
    losing a worker node never costs the registry its state. It asks for a sliver of the head's
    marker resource rather than for node affinity: Ray honours a resource on every restart (a
    replaced head has it too), while a soft affinity was measured to restart the actor on any node.
    """
    import ray

    on_head = any(n["Alive"] and HEAD_RESOURCE in n["Resources"] for n in ray.nodes())
    return (
        ray.remote(Registry)
        .options(
            name=REGISTRY_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=-1,
            num_cpus=0,
            resources={HEAD_RESOURCE: 0.001} if on_head else None,
        )
        .remote()
    )
