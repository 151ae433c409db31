"""Running the advice: search, label the Pareto set, score baselines, describe each plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybridatlas.models.cost import COST_PARTS
from hybridatlas.pipeline import AtlasModels
from hybridatlas.search import baselines
from hybridatlas.search.evaluator import CONSTRAINTS, OBJECTIVES, PlanEvaluator
from hybridatlas.search.nsga import SearchResult, nsga2_search
from hybridatlas.search.pareto import label_plans


@dataclass
class Advice:
    """A run's result: labelled Pareto plans, baselines and search statistics (JSON-ready dicts)."""

    plans: list[dict[str, Any]]
    baselines: dict[str, dict[str, Any]]
    search: dict[str, Any]
    models: AtlasModels = field(repr=False)

    def labelled(self, label: str) -> dict[str, Any] | None:
        return next((plan for plan in self.plans if label in plan["labels"]), None)

    def to_dict(self) -> dict[str, Any]:
        return {"search": self.search, "plans": self.plans, "baselines": self.baselines,
                "forecast": {"rates_per_s": self.models.rates, "components": self.models.forecast},
                "wan": {"rtt_ms": self.models.config.rtt_ms,
                        "bandwidth_gbps": self.models.config.raw["wan"]["bandwidth_gbps"]}}


def cut_edges(models: AtlasModels, cloud: set[str]) -> list[tuple[str, str]]:
    """Call-graph edges whose ends sit on different sides."""
    edges = {edge for graph in models.graphs.values() for edge in graph.calls}
    return sorted(edge for edge in edges if (edge[0] in cloud) != (edge[1] in cloud))


def describe_plan(evaluator: PlanEvaluator, bits: np.ndarray | None, labels: list[str] | None = None,
                  cloud_components: list[str] | None = None) -> dict[str, Any]:
    """Everything a reader needs about one plan: moves, per-API latency before/after, cost, disruption,
    violated constraints. The plan is a bit vector over the free components, or (for what-if questions)
    exactly `cloud_components`, whose broken pins are then listed and make it infeasible."""
    models = evaluator.models
    if cloud_components is not None:
        scores = evaluator.score(evaluator.placement(cloud_components))
        pins = evaluator.pin_violations(cloud_components)
    else:
        scores = evaluator.evaluate(np.asarray(bits, dtype=bool).reshape(1, -1))
        pins = []
    cloud_row = scores.cloud
    p95 = models.latency.p95_ms(cloud_row)[0]
    disrupted = models.availability.disrupted(cloud_row)[0]
    cloud = sorted(c for c, moved in zip(models.components, cloud_row[0]) if moved)
    return {
        "labels": labels or [],
        "cloud": cloud,
        "objectives": {name: float(v) for name, v in zip(OBJECTIVES, scores.objectives[0])},
        "cost": {part: float(v) for part, v in zip(COST_PARTS, scores.cost_parts[0])} | {"total": float(scores.cost[0])},
        "latency": {api: {"before_mean_ms": float(models.latency.baseline_mean_ms[a]),
                          "before_p95_ms": float(models.latency.baseline_p95_ms[a]),
                          "mean_ms": float(scores.mean_latency_ms[0, a]), "p95_ms": float(p95[a])}
                    for a, api in enumerate(models.apis)},
        "disrupted_apis": [api for api, hit in zip(models.apis, disrupted) if hit],
        "violations": {name: float(v) for name, v in zip(CONSTRAINTS, scores.violations[0]) if v > 1e-9},
        "pin_violations": pins,
        "feasible": bool(scores.feasible[0]) and not pins,
        "ingress_cloud_share": models.config.ingress_cloud_share,
        "cut_edges": [list(edge) for edge in cut_edges(models, set(cloud))],
    }


def run_baselines(evaluator: PlanEvaluator, search_budget: int, seed: int) -> dict[str, dict[str, Any]]:
    """The single-plan baselines and random search with the same evaluation budget as the search."""
    out = {name: describe_plan(evaluator, fn(evaluator), [name]) for name, fn in (
        ("busiest-first", baselines.busiest_first),
        ("community-grouping", lambda ev: baselines.community_grouping(ev, seed)),
        ("min-cut-grouping", baselines.mincut_grouping))}
    random = baselines.random_search(evaluator, search_budget, seed)
    out["random-search"] = {"pareto_size": int(len(random.archive.bits)), "evaluated": random.evaluated,
                            "objectives": random.archive.objectives.tolist()}
    return out


def staying_note(models: AtlasModels, plans: list[dict[str, Any]]) -> str | None:
    """Why every Pareto plan moves nothing (beyond cloud pins) and what to change; None if some plan moves."""
    if not all(plan["feasible"] and set(plan["cloud"]) <= models.pinned_cloud for plan in plans):
        return None
    what = "nothing" if not models.pinned_cloud else "nothing beyond the components pinned to the cloud"
    limits = {key: value for key, value in models.config.onprem_capacity().items() if value is not None}
    if not limits:
        return (f"the only Pareto plan moves {what}: no on-prem capacity limit is set (onprem.cpu_cores, "
                "memory_gib and disk_gib are unset), so staying on-prem is feasible and cheapest; give the "
                "capacity you have with --onprem-cpu/--onprem-memory/--onprem-disk and the expected growth with --scale")
    return (f"the only Pareto plan moves {what}: the on-prem capacity {limits} holds the forecast load, so "
            "staying on-prem is feasible and cheapest; raise --scale to plan for growth")


def advise(models: AtlasModels, with_baselines: bool = True) -> Advice:
    """Search the placements and describe the labelled Pareto set."""
    settings = models.config.search
    evaluator = PlanEvaluator(models, str(settings.get("latency_apis", "all")))
    seed = int(settings["seed"])
    seeds = [baselines.busiest_first(evaluator), baselines.community_grouping(evaluator, seed)]
    population, generations = int(settings["population"]), int(settings["generations"])
    if 2 ** evaluator.n_bits <= population * generations:
        result: SearchResult = baselines.exhaustive(evaluator)  # cheaper than evolving, and exact
    else:
        result = nsga2_search(evaluator, population, generations, seed, int(settings["local_search_rounds"]), seeds,
                              float(settings["local_search_budget"]))
    archive = result.archive
    order = np.lexsort((archive.objectives[:, 1], archive.objectives[:, 0]))
    labels = label_plans(archive.objectives[order])
    plans = []
    for rank, index in enumerate(order):
        plans.append(describe_plan(evaluator, archive.bits[index], [k for k, v in labels.items() if v == rank]))
    if not plans:
        plans.append(describe_plan(evaluator, np.zeros(evaluator.n_bits, dtype=bool), ["all on-prem (no feasible plan)"]))
    search = {"method": result.method, "evaluated": result.evaluated, "seconds": result.seconds,
              "plans_per_second": result.plans_per_second, "free_components": evaluator.free,
              "pinned_onprem": sorted(models.pinned_onprem), "pinned_cloud": sorted(models.pinned_cloud),
              "feasible_found": bool(len(archive.bits)), "note": staying_note(models, plans)}
    base = run_baselines(evaluator, result.evaluated, seed) if with_baselines else {}
    return Advice(plans, base, search, models)
