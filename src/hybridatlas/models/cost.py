"""Cost model: monthly cloud cost of a placement = compute + storage + egress + cluster fee.

Compute: the cloud side's forecast CPU and memory, plus headroom, run on a node pool of one instance
type; for each catalogued type the pool needs ceil(max(cpu / sustained vcpu, memory / memory_gib))
nodes and the cheapest type wins (sustained vcpu = vcpu x baseline_cpu_share: burstable types are
sized on their baseline). Storage: the forecast disk of each moved stateful component (at least
`min_volume_gib`). Egress: bytes leaving the cloud on every cut edge (responses of on-prem -> cloud
calls, requests of cloud -> on-prem calls); users' requests and responses cross where the ingress
option puts the gateway. Prices come from the configuration (defaults.json states
their provenance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridatlas.config import AtlasConfig

COST_PARTS = ("compute", "storage", "egress", "cluster")


@dataclass
class CostModel:
    """Vectorised cost of placements. Arrays are indexed by component (cloud = True)."""

    cpu: np.ndarray
    memory_gib: np.ndarray
    volume_gib: np.ndarray
    edge_source: np.ndarray
    edge_destination: np.ndarray
    edge_request_bytes_per_s: np.ndarray
    edge_response_bytes_per_s: np.ndarray
    config: AtlasConfig
    gateway_index: int | None = None

    def _egress_bytes_per_s(self, cloud: np.ndarray) -> np.ndarray:
        """Bytes/s leaving the cloud per plan, the gateway placed by the ingress share (mixed linearly)."""
        share = self.config.ingress_cloud_share
        total = np.zeros(cloud.shape[0])
        for weight, in_cloud in ((1.0 - share, False), (share, True)):
            if weight <= 0:
                continue
            side = cloud.copy()
            if self.gateway_index is not None:
                side[:, self.gateway_index] = in_cloud
            src, dst = side[:, self.edge_source], side[:, self.edge_destination]
            leaving = (~src & dst) * self.edge_response_bytes_per_s + (src & ~dst) * self.edge_request_bytes_per_s
            total += weight * leaving.sum(axis=1)
        return total

    def breakdown(self, cloud: np.ndarray) -> np.ndarray:
        """(plans x 4) monthly cost: compute, storage, egress, cluster."""
        cost = self.config.cost
        hours = float(cost["hours_per_month"])
        cloud_f = cloud.astype(np.float64)
        need_cpu = cloud_f @ self.cpu * (1.0 + self.config.headroom)
        need_mem = cloud_f @ self.memory_gib * (1.0 + self.config.headroom)
        compute = np.full(cloud.shape[0], np.inf)
        for inst in self.config.instances:
            cpu_per_node = self.config.sustained_vcpu(inst)
            nodes = np.ceil(np.maximum(need_cpu / cpu_per_node, need_mem / float(inst["memory_gib"])) - 1e-9)
            compute = np.minimum(compute, nodes * float(inst["per_hour"]) * hours)
        any_cloud = cloud.any(axis=1)
        compute = np.where(any_cloud, compute, 0.0)
        storage = cloud_f @ self.volume_gib * float(cost["storage_per_gib_month"])
        egress = self._egress_bytes_per_s(cloud) * (hours * 3600.0) / 1e9 * float(cost["egress_per_gb"])
        cluster = any_cloud * float(cost["cluster_fee_per_hour"]) * hours
        return np.column_stack([compute, storage, egress, cluster])

    def total(self, cloud: np.ndarray) -> np.ndarray:
        return self.breakdown(cloud).sum(axis=1)
