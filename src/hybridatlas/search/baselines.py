"""Baselines beside the search: busiest-first offloading, traffic-graph grouping (community detection
and min-cut), random search, and exhaustive enumeration for instances small enough."""

from __future__ import annotations

import time
from typing import Iterable

import networkx as nx
import numpy as np

from hybridatlas.errors import AtlasInputError
from hybridatlas.search.evaluator import PlanEvaluator
from hybridatlas.search.nsga import SearchResult
from hybridatlas.search.pareto import ParetoArchive

MAX_EXHAUSTIVE_BITS = 26


def _first_feasible(evaluator: PlanEvaluator, plans: list[np.ndarray]) -> np.ndarray:
    """The first plan of a sequence that meets every constraint, else the last one (reported infeasible)."""
    bits = np.array(plans, dtype=bool)
    feasible = evaluator.evaluate(bits).feasible
    return bits[int(np.argmax(feasible))] if feasible.any() else bits[-1]


def _cumulative(groups: Iterable[list[int]], n_bits: int) -> list[np.ndarray]:
    plans, current = [np.zeros(n_bits, dtype=bool)], np.zeros(n_bits, dtype=bool)
    for group in groups:
        current = current.copy()
        current[group] = True
        plans.append(current)
    return plans


def busiest_order(evaluator: PlanEvaluator) -> list[int]:
    """Free components, busiest (forecast CPU, then memory) first."""
    demand = evaluator.demand[evaluator.free_index]
    return [int(i) for i in np.lexsort((-demand[:, 1], -demand[:, 0]))]


def busiest_first(evaluator: PlanEvaluator) -> np.ndarray:
    """Offload the busiest components one by one until what stays fits on-prem."""
    return _first_feasible(evaluator, _cumulative(([i] for i in busiest_order(evaluator)), evaluator.n_bits))


def traffic_graph(evaluator: PlanEvaluator) -> nx.Graph:
    """Undirected component graph weighted by forecast bytes/s on each edge (both directions)."""
    cost = evaluator.models.cost
    components = evaluator.models.components
    graph = nx.Graph()
    graph.add_nodes_from(components)
    for s, d, req, resp in zip(cost.edge_source, cost.edge_destination, cost.edge_request_bytes_per_s,
                               cost.edge_response_bytes_per_s):
        a, b = components[s], components[d]
        weight = graph.get_edge_data(a, b, {"weight": 0.0})["weight"] + float(req + resp)
        graph.add_edge(a, b, weight=weight)
    return graph


def _free_positions(evaluator: PlanEvaluator, names: Iterable[str]) -> list[int]:
    position = {c: i for i, c in enumerate(evaluator.free)}
    return [position[c] for c in names if c in position]


def community_grouping(evaluator: PlanEvaluator, seed: int = 0) -> np.ndarray:
    """Dependency grouping as in vendor assessors: Louvain communities of the traffic graph are
    moved whole, the busiest group first, until what stays fits on-prem."""
    graph = traffic_graph(evaluator)
    communities = nx.community.louvain_communities(graph, weight="weight", seed=seed)
    cpu = dict(zip(evaluator.models.components, evaluator.demand[:, 0]))
    groups = [_free_positions(evaluator, c) for c in sorted(communities, key=lambda c: -sum(cpu[x] for x in c))]
    return _first_feasible(evaluator, _cumulative((g for g in groups if g), evaluator.n_bits))


def mincut_grouping(evaluator: PlanEvaluator) -> np.ndarray:
    """Min-cut offloading: the busiest free components must leave; an s-t minimum cut of the traffic
    graph (s tied to pinned on-prem components, t to the components that must leave) decides which
    others go with them. More components are forced out until what stays fits."""
    graph = traffic_graph(evaluator)
    flow = nx.DiGraph()
    for a, b, data in graph.edges(data=True):
        flow.add_edge(a, b, capacity=data["weight"])
        flow.add_edge(b, a, capacity=data["weight"])
    for component in evaluator.models.pinned_onprem:
        flow.add_edge("__onprem__", component)  # no capacity attribute = infinite
    for component in evaluator.models.pinned_cloud:
        flow.add_edge(component, "__cloud__")
    plans = [np.zeros(evaluator.n_bits, dtype=bool)]
    for position in busiest_order(evaluator):
        flow.add_edge(evaluator.free[position], "__cloud__")
        _, (_, cloud_side) = nx.minimum_cut(flow, "__onprem__", "__cloud__")
        plan = np.zeros(evaluator.n_bits, dtype=bool)
        plan[_free_positions(evaluator, cloud_side)] = True
        plans.append(plan)
    return _first_feasible(evaluator, plans)


def random_search(evaluator: PlanEvaluator, budget: int, seed: int = 0) -> SearchResult:
    """Uniformly random plans (random density per plan), same evaluation budget as the search."""
    start, before = time.perf_counter(), evaluator.evaluated
    rng = np.random.default_rng(seed)
    archive = ParetoArchive(evaluator.n_bits)
    for chunk_start in range(0, budget, 16384):
        size = min(16384, budget - chunk_start)
        bits = rng.random((size, evaluator.n_bits)) < rng.random((size, 1))
        scores = evaluator.evaluate(bits)
        archive.add(bits, scores.objectives, scores.feasible)
    return SearchResult(archive, evaluator.evaluated - before, time.perf_counter() - start, "random")


def exhaustive(evaluator: PlanEvaluator, chunk: int = 1 << 15) -> SearchResult:
    """Every one of the 2^n plans; refuses instances over MAX_EXHAUSTIVE_BITS free components."""
    n = evaluator.n_bits
    if n > MAX_EXHAUSTIVE_BITS:
        raise AtlasInputError("exhaustive search", f"{n} free components means 2^{n} plans; pin components "
                              f"until at most {MAX_EXHAUSTIVE_BITS} are free")
    start, before = time.perf_counter(), evaluator.evaluated
    archive = ParetoArchive(n)
    shifts = np.arange(n, dtype=np.int64)
    for first in range(0, 1 << n, chunk):
        numbers = np.arange(first, min(first + chunk, 1 << n), dtype=np.int64)
        bits = ((numbers[:, None] >> shifts) & 1).astype(bool)
        scores = evaluator.evaluate(bits)
        archive.add(bits, scores.objectives, scores.feasible)
    return SearchResult(archive, evaluator.evaluated - before, time.perf_counter() - start, "exhaustive")
