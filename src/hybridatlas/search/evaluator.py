"""Vectorised scoring of placements: objectives, constraints and per-API latency for plan batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridatlas.errors import AtlasInputError
from hybridatlas.config import ONPREM_RESOURCES
from hybridatlas.pipeline import AtlasModels

CONSTRAINTS = ("onprem_cpu_cores", "onprem_memory_gib", "onprem_disk_gib", "budget_per_month")
OBJECTIVES = ("cost_per_month", "latency_inflation", "disruption")


@dataclass
class Scores:
    """Scores of a batch of plans; `cloud` is the full (plans x components) placement."""

    cloud: np.ndarray
    cost_parts: np.ndarray
    mean_latency_ms: np.ndarray
    inflation: np.ndarray
    disruption: np.ndarray
    violations: np.ndarray

    @property
    def cost(self) -> np.ndarray:
        return self.cost_parts.sum(axis=1)

    @property
    def objectives(self) -> np.ndarray:
        """(plans x 3): cost rounded to cents and inflation to 1e-6, so float noise makes no fake trade-offs."""
        return np.column_stack([np.round(self.cost, 2), np.round(self.inflation, 6), self.disruption])

    @property
    def feasible(self) -> np.ndarray:
        return (self.violations <= 1e-9).all(axis=1)


class PlanEvaluator:
    """Scores plans given as bit vectors over the free (unpinned) components."""

    def __init__(self, models: AtlasModels, latency_apis: str = "all") -> None:
        self.models = models
        index = {c: i for i, c in enumerate(models.components)}
        self.free = models.free_components
        self.free_index = np.array([index[c] for c in self.free], dtype=np.int64)
        self.cloud_pinned = np.array([index[c] for c in models.pinned_cloud], dtype=np.int64)
        critical = set(models.config.critical_apis)
        chosen = [a for a in models.apis if latency_apis == "all" or a in critical] or models.apis
        self.latency_columns = np.array([models.apis.index(a) for a in chosen], dtype=np.int64)
        capacity = models.config.onprem_capacity()
        self.capacity = np.array([np.inf if capacity[k] is None else capacity[k] for k in ONPREM_RESOURCES])
        self.demand = np.column_stack([models.demand(r) for r in ONPREM_RESOURCES])
        cost = models.cost
        self.traffic = np.zeros((len(models.components), len(models.components)))
        np.add.at(self.traffic, (cost.edge_source, cost.edge_destination),
                  cost.edge_request_bytes_per_s + cost.edge_response_bytes_per_s)
        self.traffic += self.traffic.T
        budget = models.config.budget_per_month
        self.budget = np.inf if budget is None else budget
        self.evaluated = 0

    @property
    def n_bits(self) -> int:
        return len(self.free)

    def placements(self, bits: np.ndarray) -> np.ndarray:
        cloud = np.zeros((bits.shape[0], len(self.models.components)), dtype=bool)
        cloud[:, self.free_index] = bits
        cloud[:, self.cloud_pinned] = True
        return cloud

    def bits_for(self, cloud_components: list[str]) -> np.ndarray:
        """Bit vector (1 x free) moving exactly these free components; raises naming pinned ones."""
        pinned = self.pin_violations(cloud_components)
        if pinned:
            raise AtlasInputError("--cloud", "; ".join(pinned))
        return np.array([[c in cloud_components for c in self.free]], dtype=bool)

    def placement(self, cloud_components: list[str]) -> np.ndarray:
        """(1 x components) placement moving exactly these components, pins or not (for what-if questions)."""
        self.models.check_components(cloud_components, "--cloud")
        gateway = self.models.config.gateway
        if gateway in cloud_components:
            raise AtlasInputError("--cloud", f"{gateway} is the gateway: where users' traffic enters is the ingress "
                                  "option (--ingress onprem|cloud|SHARE), not a placement")
        return np.array([[c in cloud_components for c in self.models.components]], dtype=bool)

    def pin_violations(self, cloud_components: list[str]) -> list[str]:
        """The pins a placement moving exactly `cloud_components` breaks, each with the rule behind it."""
        self.models.check_components(cloud_components, "--cloud")
        pins = self.models.onprem_pins
        moved = [f"{c} is pinned on-prem by {pins[c]}" for c in sorted(set(cloud_components) & set(pins))]
        kept = [f"{c} is pinned to the cloud (placement.pinned_cloud) but stays on-prem"
                for c in sorted(self.models.pinned_cloud - set(cloud_components))]
        return moved + kept

    def boundary_traffic(self, bits: np.ndarray) -> np.ndarray:
        """(plans x free) forecast bytes/s each free component exchanges with components on the
        other side (on-prem vs cloud) in each plan."""
        cloud = self.placements(np.asarray(bits, dtype=bool))
        with_cloud = cloud.astype(np.float64) @ self.traffic[:, self.free_index]
        total = self.traffic[:, self.free_index].sum(axis=0)
        return np.where(cloud[:, self.free_index], total - with_cloud, with_cloud)

    def evaluate(self, bits: np.ndarray) -> Scores:
        """Scores of plans given as bit vectors over the free components."""
        return self.score(self.placements(np.asarray(bits, dtype=bool)))

    def score(self, cloud: np.ndarray) -> Scores:
        """Scores of full (plans x components) placements; pins are not checked here."""
        self.evaluated += len(cloud)
        latency = self.models.latency.mean_ms(cloud)
        baseline = self.models.latency.baseline_mean_ms
        inflation = (latency[:, self.latency_columns] / baseline[self.latency_columns] - 1.0).mean(axis=1)
        cost_parts = self.models.cost.breakdown(cloud)
        onprem_load = (~cloud).astype(np.float64) @ self.demand
        violations = np.column_stack([onprem_load - self.capacity, cost_parts.sum(axis=1) - self.budget])
        violations = np.where(np.isfinite(violations), violations, -1.0)
        return Scores(cloud, cost_parts, latency, inflation, self.models.availability.score(cloud), violations)

    def evaluate_chunked(self, bits: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """(objectives, violations) for many plans, in chunks to bound memory."""
        objectives, violations = [], []
        for start in range(0, len(bits), chunk):
            scores = self.evaluate(bits[start:start + chunk])
            objectives.append(scores.objectives)
            violations.append(scores.violations)
        return np.concatenate(objectives), np.concatenate(violations)

