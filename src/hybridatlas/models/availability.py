"""Availability: APIs disrupted while moved stateful components migrate their data.

An API is disrupted by a plan when its call graph (background work included) touches a stateful
component the plan moves. The score weighs critical APIs by `critical_weight` (others by 1), so a
plan that disrupts one critical API scores worse than one disrupting several ordinary ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridatlas.models.callgraph import ApiCallGraph


@dataclass
class AvailabilityModel:
    """uses[c, a] = API a touches stateful component c; weights[a] per API."""

    apis: list[str]
    uses: np.ndarray
    weights: np.ndarray

    def disrupted(self, cloud: np.ndarray) -> np.ndarray:
        """(plans x APIs) bool."""
        return (cloud.astype(np.float32) @ self.uses) > 0

    def score(self, cloud: np.ndarray) -> np.ndarray:
        return self.disrupted(cloud).astype(np.float64) @ self.weights


def build_availability(graphs: dict[str, ApiCallGraph], components: list[str], stateful: set[str],
                       critical: set[str], critical_weight: float) -> AvailabilityModel:
    apis = sorted(graphs)
    uses = np.zeros((len(components), len(apis)), dtype=np.float32)
    for a, api in enumerate(apis):
        for c, component in enumerate(components):
            uses[c, a] = component in stateful and graphs[api].uses(component)
    weights = np.array([critical_weight if api in critical else 1.0 for api in apis])
    return AvailabilityModel(apis, uses, weights)
