"""Deploying a sharded, replicated base executor on a running Ray cluster; scaling it; removing it.

A deployment ``NAME`` is ``shards x replicas`` shard actors (``ShardServer``), each serving one
layer range with the existing executor server. Placement: every replica is one placement group
with one bundle per shard — ``{"CPU": c, "GPU": g, "memory": m}`` — and strategy ``PACK`` by
default (a replica's shards on as few nodes as possible; ``SPREAD``, ``STRICT_PACK`` and
``STRICT_SPREAD`` are Ray's other strategies). A bundle no node of the cluster could ever hold is
refused at once; a placement that cannot be satisfied now is given ``placement_timeout_s``
(an autoscaler may add nodes), then refused, naming the bundles and what is free. Shard actors and
placement groups are detached (they outlive the process that deployed them) and Ray restarts a
shard actor that dies, in its bundle. The registry actor (``registry.py``) lists them for clients.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import SymbiosisError
from ..transport.ray_directory import NAMESPACE, REGISTRY_NAME, DeploymentNotFoundError, check_name, init_ray, registry
from .registry import shard_actor_name, shard_actor_names, start_registry
from .shard import ShardServer

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PG_PREFIX = "symbiosis-pg:"
#: Default seconds to wait for a placement before refusing it.
PLACEMENT_TIMEOUT_S = 120.0
#: Default seconds to wait for shard actors to load their weights and serve.
START_TIMEOUT_S = 600.0
#: Seconds Ray may take to destroy removed shard actors and placement groups.
STOP_TIMEOUT_S = 60.0
#: Weight files counted for the default memory of a shard (loading reads the whole checkpoint).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: ``symbiosis serve`` options that the deployment sets itself for each shard.
RESERVED_OPTIONS = ("--host", "--port", "--layers", "--ready-file")


class _DetachedInPlacementGroup(logging.Filter):
    """Ray warns that a restartable detached actor in a placement group dies with the group: that
    is how a deployment is removed, so the warning says nothing to its user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "restartable detached actor with a placement group" not in record.getMessage()


logging.getLogger("ray.actor").addFilter(_DetachedInPlacementGroup())


class PlacementError(SymbiosisError):
    """The cluster cannot hold the deployment's bundles (now, or ever)."""


class DeployError(SymbiosisError):
    """A shard actor failed to start."""


def even_layers(num_layers: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous layer ranges of near-equal size covering ``[0, num_layers)``."""
    if not 1 <= shards <= num_layers:
        raise ValueError(f"--shards must be between 1 and the model's {num_layers} layers, got {shards}")
    bounds = [round(i * num_layers / shards) for i in range(shards + 1)]
    return list(zip(bounds, bounds[1:]))


def deploy(
    model: str | Path,
    name: str,
    *,
    shards: int = 1,
    replicas: int = 1,
    layers: Sequence[tuple[int, int]] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    num_cpus_per_shard: float = 1.0,
    num_gpus_per_shard: float = 0.0,
    memory_per_shard: int | None = None,
    strategy: str = "PACK",
    host: str | None = None,
    serve_options: Sequence[str] = (),
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    start_timeout_s: float = START_TIMEOUT_S,
    wait_for_nodes: bool = False,
    address: str | None = None,
) -> dict[str, Any]:
    """Start deployment ``name`` of the model in directory ``model`` (the same path on every node)
    and return its status once every replica of every shard serves.

    ``layers`` gives the shards' ranges explicitly (else ``shards`` near-equal ranges); ``device``
    and ``dtype`` are the shards' (``--device cuda`` needs ``num_gpus_per_shard``, which may be a
    fraction to pack shards onto one GPU); ``memory_per_shard`` is in bytes (default: the
    checkpoint's size — a shard reads the whole checkpoint while loading); ``host`` is the address
    the servers listen on (default: each node's address); ``serve_options`` are further
    ``symbiosis serve`` options (tenants, TLS, batching, threads, ...). ``wait_for_nodes``: do not
    refuse bundles no current node can hold (an autoscaler may add such nodes). ``address``: the
    Ray cluster (default ``RAY_ADDRESS``).
    """
    spec = _spec(model, check_name(name), shards, layers, device, dtype, num_cpus_per_shard, num_gpus_per_shard, memory_per_shard, strategy, host, serve_options)
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    init_ray(address)
    import ray

    registry_actor = start_registry()
    error = ray.get(registry_actor.create.remote(spec))
    if error:
        raise DeployError(error)
    try:
        _start_replicas(spec, range(replicas), placement_timeout_s, start_timeout_s, wait_for_nodes)
    except BaseException:
        _stop_replicas(name, None, grace_s=0.0)
        ray.get(registry_actor.delete.remote(name))
        raise
    return status(name)[0]


def status(name: str | None = None, *, address: str | None = None) -> list[dict[str, Any]]:
    """Every deployment (or only ``name``) as the registry knows it; ``DeploymentNotFoundError``
    if ``name`` is not deployed."""
    init_ray(address)
    import ray

    try:
        found = ray.get(registry().describe.remote(name))
    except DeploymentNotFoundError:
        found = []
    if name is not None and not found:
        raise DeploymentNotFoundError(f"no Symbiosis deployment named {name!r} on this Ray cluster")
    return found


def scale(
    name: str,
    replicas: int,
    *,
    drain_timeout_s: float = 60.0,
    grace_s: float = 10.0,
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    start_timeout_s: float = START_TIMEOUT_S,
    wait_for_nodes: bool = False,
    address: str | None = None,
) -> dict[str, Any]:
    """Run ``replicas`` replicas of every shard of ``name`` while clients keep running.

    Scale-out starts new replicas (clients move onto them at their next renewal). Scale-in removes
    the highest-numbered replicas: they drain (the registry assigns them to nobody; at most
    ``drain_timeout_s`` for their clients to move away), then their servers stop gracefully (calls
    in flight finish, at most ``grace_s``) and their actors and placement groups are removed.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1 (symbiosis ray shutdown {name} removes a deployment), got {replicas}")
    [current] = status(name, address=address)
    import ray

    existing = sorted({r["replica"] for shard in current["shards"] for r in shard["replicas"]})
    if replicas > len(existing):
        free = (index for index in range(replicas * 2 + len(existing)) if index not in existing)
        new = [next(free) for _ in range(replicas - len(existing))]
        try:
            _start_replicas(current["spec"], new, placement_timeout_s, start_timeout_s, wait_for_nodes)
        except BaseException:
            _stop_replicas(name, new, grace_s=0.0)
            raise
    elif replicas < len(existing):
        victims = existing[replicas:]
        actors = _shard_actors(name, victims)
        ray.get([actor.drain.remote() for actor in actors.values()])
        deadline = time.monotonic() + drain_timeout_s
        while _clients_on(name, victims) and time.monotonic() < deadline:
            time.sleep(0.2)
        _stop_replicas(name, victims, grace_s=grace_s)
    return status(name)[0]


def shutdown(name: str, *, grace_s: float = 10.0, address: str | None = None) -> None:
    """Remove deployment ``name``: its servers stop gracefully, its actors and placement groups go."""
    init_ray(address)
    import ray

    if not _shard_actors(name, None) and not _placement_groups(name, None):
        status(name)  # raises if the registry does not know it either
    _stop_replicas(name, None, grace_s=grace_s)
    try:
        ray.get(registry().delete.remote(name))
    except DeploymentNotFoundError:
        pass


def shutdown_all(*, grace_s: float = 10.0, address: str | None = None) -> list[str]:
    """Remove every deployment and the registry; returns the names removed."""
    init_ray(address)
    import ray

    names = {d["name"] for d in status()} | {actor.split(":")[1] for actor in shard_actor_names()}
    for name in sorted(names):
        shutdown(name, grace_s=grace_s)
    try:
        ray.kill(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass
    return sorted(names)


# ---------------------------------------------------------------------------------- internals
def _spec(
    model: str | Path,
    name: str,
    shards: int,
    layers: Sequence[tuple[int, int]] | None,
    device: str,
    dtype: str,
    num_cpus: float,
    num_gpus: float,
    memory: int | None,
    strategy: str,
    host: str | None,
    serve_options: Sequence[str],
) -> dict[str, Any]:
    """What is deployed, checked here before anything starts on the cluster."""
    from transformers import AutoConfig

    from ..cli.serve import parse_args

    model = Path(model).resolve()
    if not (model / "config.json").is_file():
        raise ValueError(f"{model} is not a model directory (no config.json): give a local model directory, the same path on every node")
    num_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    ranges = [tuple(r) for r in layers] if layers else even_layers(num_layers, shards)
    bounds = [0, *(end for _, end in ranges)]
    if [start for start, _ in ranges] != bounds[:-1] or bounds[-1] != num_layers or any(a >= b for a, b in ranges):
        raise ValueError(f"layer ranges {ranges} must tile the model's {num_layers} layers: 0:a, a:b, ..., z:{num_layers}")
    reserved = [o for o in serve_options if o.split("=")[0] in RESERVED_OPTIONS]
    if reserved:
        raise ValueError(f"{', '.join(reserved)}: set by the deployment for each shard (use host= / --host for the listening address)")
    options = ["--device", device, "--dtype", dtype, *serve_options]
    parse_args([str(model), *options])  # a bad option fails here, not in every actor
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if num_cpus <= 0 or num_gpus < 0 or (memory is not None and memory < 0):
        raise ValueError("a shard needs more than 0 CPUs, and no negative GPUs or memory")
    if device.startswith("cuda") and num_gpus <= 0:
        raise ValueError("--device cuda needs --num-gpus-per-shard > 0: Ray gives an actor a GPU only if it asks for one")
    if memory is None:
        memory = sum(f.stat().st_size for f in model.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    return dict(
        name=name,
        uid=uuid.uuid4().hex,
        model=str(model),
        layers=ranges,
        serve_options=options,
        host=host,
        resources={"CPU": num_cpus, "GPU": num_gpus, "memory": memory},
        strategy=strategy,
        created=time.time(),
    )


def _bundle(spec: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in spec["resources"].items() if value}


def _start_replicas(spec: dict[str, Any], indexes: Iterable[int], placement_timeout_s: float, start_timeout_s: float, wait_for_nodes: bool) -> None:
    """Place and start replicas ``indexes`` of every shard; return once all serve."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    indexes = list(indexes)
    name, shards, bundle = spec["name"], len(spec["layers"]), _bundle(spec)
    if not wait_for_nodes:
        _check_fits(name, bundle, shards, len(indexes), spec["strategy"])
    groups = {r: placement_group([bundle] * shards, strategy=spec["strategy"], name=f"{PG_PREFIX}{name}:{r}", lifetime="detached") for r in indexes}
    _, pending = ray.wait([group.ready() for group in groups.values()], num_returns=len(groups), timeout=placement_timeout_s)
    if pending:
        raise PlacementError(
            f"cannot place {name}: {len(pending)} of {len(groups)} new replicas ({shards} bundles of {_describe(bundle)}, {spec['strategy']}) "
            f"found no room within {placement_timeout_s:.0f} s; free now: {_describe(ray.available_resources())}"
        )
    actor_class = ray.remote(ShardServer)
    starting = {}
    for replica, group in groups.items():
        for shard in range(shards):
            actor = actor_class.options(
                name=shard_actor_name(name, shard, replica),
                namespace=NAMESPACE,
                lifetime="detached",
                max_restarts=-1,
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                memory=bundle.get("memory"),
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=shard),
            ).remote(spec, shard, replica)
            starting[actor.describe.remote()] = (shard, replica)
    _, pending = ray.wait(list(starting), num_returns=len(starting), timeout=start_timeout_s)
    for ref, (shard, replica) in starting.items():
        if ref not in pending:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                raise DeployError(f"shard {shard} replica {replica} of {name} failed to start: {_cause(exc)}") from None
    if pending:
        raise DeployError(f"{len(pending)} shard actors of {name} did not serve within {start_timeout_s:.0f} s")


def _check_fits(name: str, bundle: dict[str, float], shards: int, replicas: int, strategy: str) -> None:
    """Refuse at once what no node (or not the whole cluster) could ever hold."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    fits = lambda resources, need: all(resources.get(k, 0) >= v for k, v in need.items())  # noqa: E731
    holders = [n for n in nodes if fits(n, bundle)]
    if not holders:
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise PlacementError(f"cannot place {name}: a shard needs {_describe(bundle)}, and no node of the Ray cluster has that much (largest: {_describe(largest)})")
    if strategy == "STRICT_PACK" and not any(fits(n, {k: v * shards for k, v in bundle.items()}) for n in nodes):
        raise PlacementError(f"cannot place {name} with STRICT_PACK: no node holds {shards} shards of {_describe(bundle)}")
    if strategy == "STRICT_SPREAD" and len(holders) < shards:
        raise PlacementError(f"cannot place {name} with STRICT_SPREAD: {shards} shards need {shards} nodes that hold {_describe(bundle)}; {len(holders)} do")
    total = {k: sum(n.get(k, 0) for n in nodes) for k in bundle}
    need = {k: v * shards * replicas for k, v in bundle.items()}
    if not fits(total, need):
        raise PlacementError(f"cannot place {name}: {replicas} replicas x {shards} shards need {_describe(need)}; the whole cluster has {_describe(total)}")


def _describe(resources: dict[str, float]) -> str:
    parts = []
    for key in ("CPU", "GPU", "memory"):
        value = resources.get(key, 0)
        if value or key == "CPU":
            parts.append(f"{value / 2**30:.2f} GiB memory" if key == "memory" else f"{value:g} {key}")
    return ", ".join(parts)


def _cause(exc: Exception) -> str:
    """The last line of the original error of a shard actor that failed to start."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and ":" in line and not line.startswith(" ")]
    return (errors or lines or [type(exc).__name__])[-1].strip()


def _shard_actors(name: str, replicas: Iterable[int] | None) -> dict[tuple[int, int], Any]:
    """Handles of the shard actors of ``name`` (only of ``replicas`` if given) by (shard, replica)."""
    import ray

    wanted = None if replicas is None else set(replicas)
    out = {}
    for actor in shard_actor_names(name):
        _, _, shard, replica = actor.split(":")
        if wanted is None or int(replica) in wanted:
            try:
                out[(int(shard), int(replica))] = ray.get_actor(actor, namespace=NAMESPACE)
            except ValueError:  # gone meanwhile
                continue
    return out


def _placement_groups(name: str, replicas: Iterable[int] | None) -> list[Any]:
    import ray
    from ray.util.placement_group import PlacementGroup

    wanted = None if replicas is None else {f"{PG_PREFIX}{name}:{r}" for r in replicas}
    prefix = f"{PG_PREFIX}{name}:"
    return [
        PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
        for pg_id, info in ray.util.placement_group_table().items()
        if info["state"] != "REMOVED" and info["name"].startswith(prefix) and (wanted is None or info["name"] in wanted)
    ]


def _wait_gone(name: str, replicas: list[int] | None, actor_names: set[str], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Return once Ray has destroyed the named shard actors and removed the replicas' placement
    groups (``ray.kill`` and group removal only start that), so their resources are free and no
    listing shows them; ``DeployError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        actors = actor_names & set(shard_actor_names(name))
        groups = _placement_groups(name, replicas)
        if not actors and not groups:
            return
        if time.monotonic() >= deadline:
            raise DeployError(f"{len(actors)} shard actors and {len(groups)} placement groups of {name} still exist {timeout_s:.0f} s after their removal")
        time.sleep(0.05)


def _clients_on(name: str, replicas: Sequence[int]) -> int:
    [current] = status(name)
    return sum(r["clients"] for shard in current["shards"] for r in shard["replicas"] if r["replica"] in replicas)


def _stop_replicas(name: str, replicas: Iterable[int] | None, *, grace_s: float) -> None:
    """Stop replicas ``replicas`` (all if None) of ``name``: servers drain, actors and placement groups go."""
    import ray
    from ray.util.placement_group import remove_placement_group

    replicas = None if replicas is None else list(replicas)
    actors = _shard_actors(name, replicas)
    if grace_s > 0 and actors:
        ray.wait([actor.stop.remote(grace_s) for actor in actors.values()], num_returns=len(actors), timeout=grace_s + 10)
    for actor in actors.values():
        ray.kill(actor, no_restart=True)
    for group in _placement_groups(name, replicas):
        remove_placement_group(group)
    _wait_gone(name, replicas, {shard_actor_name(name, shard, replica) for shard, replica in actors})
    try:
        handle = registry()
    except DeploymentNotFoundError:
        return
    for replica in replicas if replicas is not None else sorted({r for _, r in actors}):
        handle.remove.remote(name, replica)
