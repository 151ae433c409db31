"""Resource model: per-component CPU, memory and disk as a function of per-API traffic.

The resource runs and the network run cover different periods, so the resource runs have no
per-API call counts. Each component's load is measured in both through the same quantity: bytes
per second it sends and receives. In a resource run that is the pod's own network counter; under a
forecast traffic mix it is derived from the network footprint (bytes per call of every API on every
edge touching the component, plus background bytes). CPU and memory are fitted as
intercept + slope x bytes/s (both >= 0, NNLS) over all resource runs pooled; disk usage is the last
observed size plus its observed growth per received byte (writes arrive as received bytes) times the
forecast received bytes over the horizon.
Pod counters include sidecar and tracing traffic that the Istio footprint does not: slopes learned
on them, applied to footprint bytes, underestimate the load by that overhead (see docs/atlas.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from hybridatlas.errors import warn_data
from hybridatlas.ingest.dataset import ResourceRun
from hybridatlas.models.footprint import Footprint

GIB = float(2**30)
FITTED = ("cpu_cores", "memory_bytes")
NETWORK = {"net_rx_bytes_per_s": "network receive bytes/s", "net_tx_bytes_per_s": "network transmit bytes/s"}


@dataclass
class LinearFit:
    """value = intercept + slope * bytes_per_s, with fit quality."""

    intercept: float
    slope: float
    r2: float
    samples: int

    def predict(self, bytes_per_s: float) -> float:
        return self.intercept + self.slope * bytes_per_s


@dataclass
class DiskState:
    """Last observed disk usage and growth per received byte."""

    last_gib: float
    growth_gib_per_byte: float


@dataclass
class ResourceModel:
    """Fits per component and metric, and disk state for components with volumes."""

    fits: dict[str, dict[str, LinearFit]] = field(default_factory=dict)
    disks: dict[str, DiskState] = field(default_factory=dict)
    observed_max_bytes_per_s: dict[str, float] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return sorted(self.fits)

    def forecast(self, traffic: dict[str, tuple[float, float]], horizon_days: float) -> dict[str, dict[str, float]]:
        """{component: {cpu_cores, memory_gib, disk_gib}} given per-component (received, sent) bytes/s."""
        out = {}
        bytes_per_s = {component: sum(pair) for component, pair in traffic.items()}
        for component, fits in self.fits.items():
            load = bytes_per_s.get(component, 0.0)
            received = traffic.get(component, (0.0, 0.0))[0]
            disk = self.disks.get(component)
            out[component] = {
                "cpu_cores": fits["cpu_cores"].predict(load),
                "memory_gib": fits["memory_bytes"].predict(load) / GIB,
                "disk_gib": disk.last_gib + disk.growth_gib_per_byte * received * horizon_days * 86400.0 if disk else 0.0,
            }
        beyond = [c for c, load in bytes_per_s.items()
                  if c in self.observed_max_bytes_per_s and load > 2.0 * self.observed_max_bytes_per_s[c] > 0]
        if beyond:
            warn_data("resource forecast", f"forecast traffic of {beyond} is over twice the most ever observed; "
                      "the linear fit is extrapolated")
        return out


def _fit_line(x: np.ndarray, y: np.ndarray) -> LinearFit:
    ok = ~np.isnan(x) & ~np.isnan(y)
    x, y = x[ok], y[ok]
    if len(y) < 2:
        return LinearFit(float(y.mean()) if len(y) else 0.0, 0.0, 0.0, int(len(y)))
    scale = max(float(x.max()), 1e-12)
    coef, _ = nnls(np.column_stack([np.ones_like(x), x / scale]), y)
    residual = y - coef[0] - coef[1] * x / scale
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return LinearFit(float(coef[0]), float(coef[1] / scale), r2, int(len(y)))


def _network(run: ResourceRun, component: str) -> np.ndarray | None:
    rx, tx = (run.metrics[metric] for metric in NETWORK)
    if component not in rx.names or component not in tx.names:
        return None
    return np.nan_to_num(rx.column(component)) + np.nan_to_num(tx.column(component))


def usable_runs(runs: list[ResourceRun]) -> list[ResourceRun]:
    """Runs holding both network series (the traffic proxy); the others are warned about and left out."""
    usable = []
    for run in runs:
        missing = [f"{metric} ({what})" for metric, what in NETWORK.items() if metric not in run.metrics]
        if missing:
            warn_data(run.name, f"no {' or '.join(missing)} series: its CPU and memory cannot be related to "
                      "traffic, so this run is not used for the resource model")
        else:
            usable.append(run)
    return usable


def learn_resources(runs: list[ResourceRun]) -> ResourceModel:
    """Fit the resource model on all runs; runs and components lacking network or CPU series are warned about."""
    model = ResourceModel()
    runs = usable_runs(runs)
    components = sorted({c for run in runs for c in run.metrics["cpu_cores"].names})
    skipped: dict[str, list[str]] = {}
    for component in components:
        loads: list[np.ndarray] = []
        values: dict[str, list[np.ndarray]] = {metric: [] for metric in FITTED}
        for run in runs:
            load = _network(run, component)
            if load is None or component not in run.metrics["cpu_cores"].names:
                skipped.setdefault(run.name, []).append(component)
                continue
            loads.append(load)
            for metric in FITTED:
                table = run.metrics.get(metric)
                column = table.column(component) if table is not None and component in table.names else np.full_like(load, np.nan)
                values[metric].append(column)
            disk_table = run.metrics.get("disk_gib")
            if disk_table is not None and component in disk_table.names:
                received = np.nan_to_num(run.metrics["net_rx_bytes_per_s"].column(component))
                model.disks[component] = _disk_state(disk_table.timestamps, disk_table.column(component), received)
        if not loads:
            continue
        x = np.concatenate(loads)
        model.fits[component] = {metric: _fit_line(x, np.concatenate(values[metric])) for metric in FITTED}
        model.observed_max_bytes_per_s[component] = float(np.nanmax(x))
    for run_name, names in skipped.items():
        warn_data(run_name, f"components {names} have no network or CPU series in this run; run skipped for them")
    return model


def _disk_state(timestamps: np.ndarray, usage_gib: np.ndarray, received: np.ndarray) -> DiskState:
    ok = ~np.isnan(usage_gib)
    if ok.sum() < 2:
        return DiskState(float(np.nan_to_num(usage_gib[ok][-1:]).sum()), 0.0)
    t, u = timestamps[ok].astype(float), usage_gib[ok]
    slope = max(float(np.polyfit(t - t[0], u, 1)[0]), 0.0)  # GiB per second
    mean_received = float(np.nanmean(received)) if len(received) else 0.0
    return DiskState(float(u[-1]), slope / mean_received if mean_received > 0 else 0.0)


def component_traffic(footprint: Footprint, rates: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(received, sent) bytes/s of each component under the given calls/s per API.

    On edge (source -> destination) request bytes are sent by the source and received by the
    destination; response bytes the other way.
    """
    rate_vector = np.array([rates.get(api, 0.0) for api in footprint.apis])
    request = footprint.matrix("request") @ rate_vector
    response = footprint.matrix("response") @ rate_vector
    traffic: dict[str, list[float]] = {}
    for (source, destination), req, resp in zip(footprint.edges, request, response):
        bg_req, bg_resp = footprint.background_bytes_per_s((source, destination))
        req, resp = float(req) + bg_req, float(resp) + bg_resp
        src, dst = traffic.setdefault(source, [0.0, 0.0]), traffic.setdefault(destination, [0.0, 0.0])
        src[0] += resp
        src[1] += req
        dst[0] += req
        dst[1] += resp
    return {component: (pair[0], pair[1]) for component, pair in traffic.items()}
