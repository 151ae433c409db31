"""From telemetry and configuration to the learned models a plan is scored with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.dataset import Telemetry
from hybridatlas.models.availability import AvailabilityModel, build_availability
from hybridatlas.models.callgraph import ApiCallGraph, build_call_graphs, check_known_components
from hybridatlas.models.cost import CostModel
from hybridatlas.models.footprint import Footprint, learn_footprint
from hybridatlas.models.latency import LatencyModel, build_latency_model
from hybridatlas.models.resources import ResourceModel, component_traffic, learn_resources
from hybridatlas.models.traffic import rates_from_history, scale_rates


def demand_vector(forecast: dict[str, dict[str, float]], components: list[str], resource: str) -> np.ndarray:
    """Forecast demand of one resource per component, in `components` order (0 when unknown)."""
    return np.array([forecast.get(c, {}).get(resource, 0.0) for c in components])


@dataclass
class AtlasModels:
    """Everything needed to score placements; `components` indexes every per-component array."""

    config: AtlasConfig
    components: list[str]
    kinds: dict[str, str]
    stateful: set[str]
    onprem_pins: dict[str, str]
    pinned_cloud: set[str]
    graphs: dict[str, ApiCallGraph]
    footprint: Footprint | None
    resources: ResourceModel | None
    rates: dict[str, float]
    forecast: dict[str, dict[str, float]]
    latency: LatencyModel
    cost: CostModel
    availability: AvailabilityModel

    @property
    def apis(self) -> list[str]:
        return self.latency.apis

    @property
    def pinned_onprem(self) -> set[str]:
        return set(self.onprem_pins)

    @property
    def free_components(self) -> list[str]:
        return [c for c in self.components if c not in self.pinned_onprem | self.pinned_cloud]

    def demand(self, resource: str) -> np.ndarray:
        """Forecast demand per component, in `components` order."""
        return demand_vector(self.forecast, self.components, resource)

    def check_components(self, names: list[str], source: str) -> None:
        """Raise naming every component that Atlas does not know."""
        unknown = sorted(set(names) - set(self.components))
        if unknown:
            raise AtlasInputError(source, f"unknown component(s) {unknown}; known components: {self.components}")


def _kinds_and_stateful(components: list[str], telemetry: Telemetry, config: AtlasConfig) -> tuple[dict[str, str], set[str]]:
    info = telemetry.component_info
    kinds = {c: info[c]["kind"] if c in info else config.kind_of(c) for c in components}
    kinds[config.gateway] = "gateway"
    rules = config.stateful
    stateful = {c for c in components if (info[c]["stateful"] if c in info else kinds[c] in rules["kinds"])}
    stateful |= set(rules.get("components", []))
    stateful -= set(rules.get("not_stateful", []))
    return kinds, stateful


def _pins(components: list[str], kinds: dict[str, str], config: AtlasConfig) -> tuple[dict[str, str], set[str]]:
    """On-prem pins, each with the rule that pinned it, and cloud pins; raises on unknown names or clashes."""
    for label, names in (("placement.pinned_onprem", config.pinned_onprem), ("placement.pinned_cloud", config.pinned_cloud)):
        unknown = sorted(set(names) - set(components))
        if unknown:
            raise AtlasInputError(label, f"unknown component(s) {unknown}; known components: {components}")
    onprem: dict[str, str] = {}
    for c in components:
        if c in config.pinned_onprem:
            onprem[c] = "placement.pinned_onprem"
        elif c == config.gateway:
            onprem[c] = "gateway (placed by the ingress option)"
        elif kinds[c] in config.pinned_onprem_kinds:
            onprem[c] = f"placement.pinned_onprem_kinds (kind '{kinds[c]}')"
    cloud = set(config.pinned_cloud)
    clash = sorted(set(onprem) & cloud)
    if clash:
        raise AtlasInputError("placement", "component(s) pinned both on-prem and to the cloud: "
                              + ", ".join(f"{c} (on-prem by {onprem[c]})" for c in clash))
    return onprem, cloud


def check_forecast(components: list[str], forecast: dict[str, dict[str, float]], gateway: str) -> None:
    """Warn about components without a resource forecast: they count as zero load everywhere."""
    missing = [c for c in components if c not in forecast and c != gateway]
    if not missing:
        return
    scope = "NO component has" if not forecast else f"components {missing} have"
    warn_data("resource forecast", f"{scope} a resource forecast (no usable CPU, memory and network series): "
              "a component without one counts as zero CPU, memory and disk, so the on-prem capacity constraints "
              "ignore its load and moving it costs no compute; feasibility and savings are overstated")


def declared_demand(components: list[str], forecast: dict[str, dict[str, float]],
                    info: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For components without a measured forecast, the CPU and memory their Kubernetes objects request
    and the size of their volumes (with a warning naming them); also volume sizes where the forecast
    has no disk."""
    declared = {}
    for c in components:
        facts = info.get(c, {})
        if not any(key in facts for key in ("cpu_cores", "memory_gib", "volume_gib")):
            continue
        if c in forecast:
            if not forecast[c].get("disk_gib") and facts.get("volume_gib"):
                declared[c] = {**forecast[c], "disk_gib": float(facts["volume_gib"])}
            continue
        declared[c] = {"cpu_cores": float(facts.get("cpu_cores", 0.0)), "memory_gib": float(facts.get("memory_gib", 0.0)),
                       "disk_gib": float(facts.get("volume_gib", 0.0))}
    requested = sorted(c for c in declared if c not in forecast)
    if requested:
        warn_data("resource forecast", f"components {requested} have no resource series: their CPU and memory "
                  "are the Kubernetes requests and their disk the volume sizes, not measured load")
    return declared


def forecast_rates(telemetry: Telemetry, config: AtlasConfig, rates: dict[str, float] | None) -> dict[str, float]:
    """The given calls/s per API, or history extrapolated by the `forecast` settings; times forecast.scale."""
    settings = config.forecast
    if rates is None:
        if telemetry.api_calls is None:
            raise AtlasInputError("traffic forecast", "no API call series: give the expected traffic mix and volume")
        rates = rates_from_history(telemetry.api_calls, config.series_window_s or telemetry.window_s,
                                   float(settings["history_minutes"]),
                                   bool(settings["trend"]), float(settings["horizon_days"]))
    return scale_rates(rates, float(settings["scale"]))


def build_models(telemetry: Telemetry, config: AtlasConfig, rates: dict[str, float] | None = None) -> AtlasModels:
    """Learn call graphs, footprint, resource model; forecast; compile latency, cost and availability."""
    graphs = build_call_graphs(telemetry.traces, config)
    footprint = None
    if telemetry.request_bytes is not None and telemetry.response_bytes is not None and telemetry.api_calls is not None:
        footprint = learn_footprint(telemetry.request_bytes, telemetry.response_bytes, telemetry.api_calls,
                                    graphs, config.series_window_s or telemetry.window_s)
    else:
        warn_data("telemetry", "no byte or call series: WAN transfer time and egress are taken as zero")
    resources = learn_resources(telemetry.resource_runs) if telemetry.resource_runs else None
    names = {c for g in graphs.values() for c in g.components}
    if footprint is not None:
        names |= {c for edge in footprint.edges for c in edge}
    if resources is not None:
        in_series = {c for run in telemetry.resource_runs for table in run.metrics.values() for c in table.names}
        check_known_components(graphs, in_series | {config.gateway}, "traces")
        names |= set(resources.components)
    names.add(config.gateway)
    components = sorted(names)
    kinds, stateful = _kinds_and_stateful(components, telemetry, config)
    onprem_pins, pinned_cloud = _pins(components, kinds, config)
    rates = forecast_rates(telemetry, config, rates)
    traffic = component_traffic(footprint, rates) if footprint is not None else {}
    forecast = resources.forecast(traffic, float(config.forecast["horizon_days"])) if resources is not None else {}
    declared = declared_demand(components, forecast, telemetry.component_info)
    forecast = {**forecast, **declared}
    if resources is None and not declared:
        warn_data("telemetry", "no resource series: utilisation, capacity constraints and compute cost are zero")
    else:
        check_forecast(components, forecast, config.gateway)
    latency = build_latency_model(telemetry.traces, components, config, footprint, graphs, kinds, rates)
    unknown_critical = sorted(set(config.critical_apis) - set(graphs))
    if unknown_critical:
        raise AtlasInputError("availability.critical_apis", f"unknown API(s) {unknown_critical}; known: {sorted(graphs)}")
    return AtlasModels(
        config, components, kinds, stateful, onprem_pins, pinned_cloud, graphs, footprint, resources, rates,
        forecast, latency,
        cost=build_cost_model(components, stateful, forecast, footprint, rates, config),
        availability=build_availability(graphs, components, stateful, set(config.critical_apis), config.critical_weight))


def build_cost_model(components: list[str], stateful: set[str], forecast: dict[str, dict[str, float]],
                     footprint: Footprint | None, rates: dict[str, float], config: AtlasConfig) -> CostModel:
    """Per-component demand and per-edge bytes/s (forecast traffic plus background) for the cost model."""
    index = {c: i for i, c in enumerate(components)}
    volume = np.where([c in stateful for c in components],
                      np.maximum(demand_vector(forecast, components, "disk_gib"), float(config.cost["min_volume_gib"])), 0.0)
    edges = footprint.edges if footprint is not None else []
    request = np.zeros(len(edges))
    response = np.zeros(len(edges))
    if footprint is not None:
        rate_vector = np.array([rates.get(api, 0.0) for api in footprint.apis])
        background = np.array([footprint.background_bytes_per_s(e) for e in edges])
        request = footprint.matrix("request") @ rate_vector + background[:, 0]
        response = footprint.matrix("response") @ rate_vector + background[:, 1]
    return CostModel(
        cpu=demand_vector(forecast, components, "cpu_cores"),
        memory_gib=demand_vector(forecast, components, "memory_gib"), volume_gib=volume,
        edge_source=np.array([index[e[0]] for e in edges], dtype=np.int64),
        edge_destination=np.array([index[e[1]] for e in edges], dtype=np.int64),
        edge_request_bytes_per_s=request, edge_response_bytes_per_s=response, config=config,
        gateway_index=index.get(config.gateway))
