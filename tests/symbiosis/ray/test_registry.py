"""The registry's bookkeeping and assignment policy, without a cluster (its methods are plain Python)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from symbiosis.ray import registry as registry_module  # noqa: E402
from symbiosis.ray.registry import Registry  # noqa: E402

SPEC = {"name": "base", "uid": "u1", "layers": [(0, 2), (2, 4)]}


def ready(registry: Registry, shard: int, replica: int, *, node: str = "n0", state: str = "ready") -> None:
    info = dict(state=state, address=f"symbiosis://h:{100 * shard + replica}", fingerprint="f", node_id=node, pid=1, metrics_port=None, since=0.0)
    registry.report(SPEC, shard, replica, info)


def replicas_of(answer: dict) -> list[int]:
    return [endpoint["replica"] for endpoint in answer["endpoints"]]


def assign(registry: Registry, client: str, current: list[int] | None = None, avoid: list[str] = (), node: str | None = None) -> dict:
    return registry.assign("base", client, current or [], list(avoid), 60.0, node)


def test_clients_spread_evenly_and_stick():
    registry = Registry()
    assert registry.create(dict(SPEC)) is None
    assert "exists already" in registry.create(dict(SPEC))
    for shard in (0, 1):
        for replica in (0, 1):
            ready(registry, shard, replica)
    first = {c: replicas_of(assign(registry, c)) for c in "abcd"}
    assert sorted(r[0] for r in first.values()) == [0, 0, 1, 1] and sorted(r[1] for r in first.values()) == [0, 0, 1, 1]
    for client, current in first.items():  # renewals keep every client where it is
        assert replicas_of(assign(registry, client, current)) == current
    clients = {(s["shard"], r["replica"]): r["clients"] for s in registry.describe("base")[0]["shards"] for r in s["replicas"]}
    assert clients == {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2}


def test_scale_out_and_in_move_clients():
    registry = Registry()
    registry.create(dict(SPEC))
    for shard in (0, 1):
        ready(registry, shard, 0)
    current = {c: replicas_of(assign(registry, c)) for c in "abcd"}
    assert all(r == [0, 0] for r in current.values())
    for shard in (0, 1):  # scale out: the new replica takes half of the clients as they renew
        ready(registry, shard, 1)
    current = {c: replicas_of(assign(registry, c, current[c])) for c in "abcd"}
    assert sorted(r[0] for r in current.values()) == [0, 0, 1, 1]
    for shard in (0, 1):  # scale in: replica 1 drains and loses every client at their next renewal
        ready(registry, shard, 1, state="draining")
    current = {c: replicas_of(assign(registry, c, current[c])) for c in "abcd"}
    assert all(r == [0, 0] for r in current.values())
    registry.remove("base", 1)
    assert [len(s["replicas"]) for s in registry.describe("base")[0]["shards"]] == [1, 1]


def test_unreachable_addresses_are_avoided_while_others_serve():
    registry = Registry()
    registry.create(dict(SPEC))
    for shard in (0, 1):
        for replica in (0, 1):
            ready(registry, shard, replica)
    assert replicas_of(assign(registry, "a", [0, 0], avoid=["symbiosis://h:0"])) == [1, 0]
    # every replica of shard 0 avoided: the registry cannot know better, it still answers (balanced)
    assert replicas_of(assign(registry, "b", [1, 1], avoid=["symbiosis://h:1", "symbiosis://h:0"])) == [0, 1]


def test_same_node_breaks_ties():
    registry = Registry()
    registry.create(dict(SPEC))
    for shard in (0, 1):
        ready(registry, shard, 0, node="n0")
        ready(registry, shard, 1, node="n1")
    assert replicas_of(assign(registry, "a", node="n1")) == [1, 1]
    assert replicas_of(assign(registry, "b", node="n1")) == [0, 0]  # balance first


def test_answers_while_shards_are_missing_or_restarting():
    registry = Registry()
    assert "no Symbiosis deployment named 'base'" in assign(registry, "a")["unknown"]
    registry.create(dict(SPEC))
    ready(registry, 0, 0)
    ready(registry, 1, 0, state="starting")
    assert assign(registry, "a")["unavailable"] == "shard 1 of base has no ready replica (replica 0: starting)"
    ready(registry, 1, 0)
    assert replicas_of(assign(registry, "a")) == [0, 0]
    starts = [r["starts"] for s in registry.describe()[0]["shards"] for r in s["replicas"]]
    assert starts == [1, 1]  # shard 1 reported "starting" then "ready": one start


def test_a_restarted_registry_learns_deployments_from_their_actors():
    """A registry that lost its state (restarted) rebuilds a deployment from its shard actors' reports;
    reports of deleted deployments' actors are ignored."""
    registry = Registry()
    for shard in (0, 1):
        ready(registry, shard, 0)
    [deployment] = registry.describe()
    assert deployment["spec"] == SPEC and [len(s["replicas"]) for s in deployment["shards"]] == [1, 1]
    registry.delete("base")
    ready(registry, 0, 0)  # a late report from an actor of the deleted deployment
    assert registry.describe() == []


def test_a_restarted_registry_holds_clients_off_until_the_shards_report(monkeypatch):
    """While shard actors of a deployment exist that have not reported to a restarted registry yet,
    a client is told to retry, not that the deployment does not exist."""
    monkeypatch.setattr(registry_module, "shard_actor_names", lambda deployment=None: [f"symbiosis-shard:{deployment}:0:0"])
    registry = Registry()
    assert "have not reported again yet" in assign(registry, "a")["unavailable"]
    for shard in (0, 1):
        ready(registry, shard, 0)
    assert replicas_of(assign(registry, "a")) == [0, 0]
