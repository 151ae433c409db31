"""The telemetry bundle Atlas learns from, loaded from files (a data directory or explicit paths) or live."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.csvfiles import load_api_calls_csv, load_edge_bytes_csv, load_resources_csv
from hybridatlas.ingest.files import read_json
from hybridatlas.ingest.kubernetes import load_kubernetes, peer_component
from hybridatlas.ingest.traces import Trace, load_traces
from hybridatlas.ingest.live import JaegerClient, PrometheusClient
from hybridatlas.ingest.prometheus import component_key, edge_key, label_key, load_query_range
from hybridatlas.ingest.series import SeriesTable

# Prometheus file stem (<stem>.query_range.json[.gz]) -> canonical resource metric.
RESOURCE_FILES = {
    "cpu_cores": "cpu_cores",
    "memory_rss_bytes": "memory_bytes",
    "disk_usage_gb": "disk_gib",
    "read_iops": "read_iops",
    "write_iops": "write_iops",
    "read_bytes_per_second": "read_bytes_per_s",
    "write_bytes_per_second": "write_bytes_per_s",
    "network_receive_bytes_per_second": "net_rx_bytes_per_s",
    "network_transmit_bytes_per_second": "net_tx_bytes_per_s",
}
WINDOW_S = 60.0


@dataclass
class ResourceRun:
    """Per-component resource series of one observation period; metric -> table keyed by component."""

    name: str
    metrics: dict[str, SeriesTable]


@dataclass
class Telemetry:
    """Everything Atlas learns from. Byte and call tables count per trailing `window_s` window."""

    traces: list[Trace]
    request_bytes: SeriesTable | None = None
    response_bytes: SeriesTable | None = None
    api_calls: SeriesTable | None = None
    resource_runs: list[ResourceRun] = field(default_factory=list)
    component_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    window_s: float = WINDOW_S

    def add_components(self, kubernetes: str | Path | None = None, components: str | Path | None = None,
                       kind_of=None) -> None:
        """Component facts from Kubernetes objects, then components.json (which wins per component); trace
        peers named by a Service or DNS name are resolved to components."""
        aliases: dict[str, str] = {}
        if kubernetes is not None:
            info, aliases = load_kubernetes(kubernetes, kind_of)
            self.component_info.update(info)
        if components is not None:
            for name, facts in load_component_info(components).items():
                self.component_info[name] = {**self.component_info.get(name, {}), **facts}
        for trace in self.traces:
            for span in trace.spans:
                if span.peer:
                    span.peer = peer_component(span.peer, aliases)

    @property
    def apis(self) -> list[str]:
        return sorted({trace.api for trace in self.traces})


def api_calls_from_traces(traces: list[Trace], step_s: float = 5.0, window_s: float = WINDOW_S,
                          grid: np.ndarray | None = None) -> SeriesTable:
    """Per-API counts of root spans starting in trailing windows (t - window_s, t].

    The times t are a step_s grid over the traced period, or the points of `grid` (e.g. a byte series'
    timestamps) that fall in it: from the first root start to the last one plus window_s.
    """
    starts = np.array([trace.root.start_us / 1e6 for trace in traces])
    apis = sorted({trace.api for trace in traces})
    if grid is None:
        first = np.ceil(starts.min() / step_s) * step_s
        grid = np.arange(first, starts.max() + window_s + step_s, step_s)
    else:
        grid = grid[(grid >= starts.min()) & (grid <= starts.max() + window_s)]
    values = np.zeros((len(grid), len(apis)))
    for k, api in enumerate(apis):
        api_starts = np.sort(starts[[trace.api == api for trace in traces]])
        values[:, k] = np.searchsorted(api_starts, grid, side="right") - np.searchsorted(api_starts, grid - window_s, side="right")
    return SeriesTable(np.asarray(grid).astype(np.int64), list(apis), values, "API calls counted from trace roots")


def calls_for_byte_series(traces: list[Trace], byte_series: SeriesTable, source: str | Path, provide: str) -> SeriesTable:
    """Per-API calls counted from the traces' root spans on the byte series' timestamps, with a warning.

    Raises, saying what to `provide`, when the traces and the byte series cover different periods.
    """
    calls = api_calls_from_traces(traces, grid=byte_series.timestamps)
    if not len(calls.timestamps):
        starts = [trace.root.start_us / 1e6 for trace in traces]
        raise AtlasInputError(source, f"no per-API call counts, and the traces ([{min(starts):.0f}, {max(starts):.0f}]) "
                              f"are from another period than the byte series ([{byte_series.timestamps[0]}, "
                              f"{byte_series.timestamps[-1]}], Unix s), so calls cannot be counted from them; "
                              f"provide {provide}")
    warn_data(source, "no per-API call counts: counting calls from the traces' root spans (if tracing samples "
              "requests, call volumes are understated and bytes per call overstated)")
    return calls


def _find_file(directory: Path, *names: str) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def load_resource_run(path: str | Path) -> ResourceRun:
    """A resource run from a directory (prometheus/*.query_range.json[.gz] or resources.csv) or a CSV file."""
    path = Path(path)
    if path.is_file():
        return ResourceRun(path.stem, load_resources_csv(path))
    prom_dir = path / "prometheus"
    if prom_dir.is_dir():
        metrics: dict[str, SeriesTable] = {}
        for stem, metric in RESOURCE_FILES.items():
            file = _find_file(prom_dir, f"{stem}.query_range.json.gz", f"{stem}.query_range.json")
            if file is not None:
                metrics[metric] = load_query_range(file, component_key)
        if "cpu_cores" not in metrics or "memory_bytes" not in metrics:
            raise AtlasInputError(prom_dir, "needs at least cpu_cores and memory_rss_bytes query_range files")
        return ResourceRun(path.name, metrics)
    csv_file = path / "resources.csv"
    if csv_file.is_file():
        return ResourceRun(path.name, load_resources_csv(csv_file))
    raise AtlasInputError(path, "not a resource run: expected prometheus/*.query_range.json[.gz] or resources.csv")


def load_edge_bytes(request: str | Path, response: str | Path | None = None) -> tuple[SeriesTable, SeriesTable]:
    """Per-edge bytes from two query_range JSON files, or from one long CSV (response=None)."""
    if response is None:
        return load_edge_bytes_csv(request)
    return load_query_range(request, edge_key), load_query_range(response, edge_key)


def load_component_info(path: str | Path) -> dict[str, dict[str, Any]]:
    """components.json -> {name: {"kind", "stateful"}} (the gateway included)."""
    document = read_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("components"), list):
        raise AtlasInputError(path, "expected an object with a 'components' list")
    info: dict[str, dict[str, Any]] = {}
    for entry in document["components"]:
        if "name" not in entry or "kind" not in entry:
            raise AtlasInputError(path, f"component entry lacks name or kind: {entry}")
        info[entry["name"]] = {"kind": entry["kind"], "stateful": bool(entry.get("stateful", False))}
    gateway = document.get("gateway")
    if isinstance(gateway, dict) and "name" in gateway:
        info[gateway["name"]] = {"kind": "gateway", "stateful": False}
    return info


def load_directory(data_dir: str | Path, kind_of=None) -> Telemetry:
    """Load the standard layout: traces/, a network run (istio_*query_range.json[.gz] or edge_bytes.csv,
    api_calls.csv), resource runs (resources.csv or prometheus/), and optionally kubernetes.json (kubectl
    get deploy,sts,svc,pvc -o json) and components.json. `kind_of` names the kind of a Kubernetes
    workload whose images say nothing (default 'service')."""
    root = Path(data_dir)
    if not root.is_dir():
        raise AtlasInputError(root, "data directory not found")
    trace_dir = root / "traces"
    if not trace_dir.is_dir():
        raise AtlasInputError(root, "no traces/ directory with Jaeger JSON files")
    telemetry = Telemetry(traces=load_traces([trace_dir]))
    network_dirs, resource_dirs = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p != trace_dir):
        if _find_file(sub, "istio_request_bytes.query_range.json.gz", "istio_request_bytes.query_range.json", "edge_bytes.csv"):
            network_dirs.append(sub)
        if (sub / "resources.csv").is_file() or (sub / "prometheus").is_dir():
            resource_dirs.append(sub)
    if len(network_dirs) > 1:
        warn_data(root, f"several network runs {[d.name for d in network_dirs]}; using {network_dirs[-1].name}")
    if network_dirs:
        _load_network_run(telemetry, network_dirs[-1])
    else:
        warn_data(root, "no per-edge byte series found: the network footprint cannot be learned; "
                  "API call rates are counted from the traces' root spans")
        telemetry.api_calls = api_calls_from_traces(telemetry.traces)
    telemetry.resource_runs = [load_resource_run(d) for d in resource_dirs]
    if not telemetry.resource_runs:
        warn_data(root, "no resource run found: utilisation cannot be forecast")
    kubernetes, components = root / "kubernetes.json", root / "components.json"
    telemetry.add_components(kubernetes if kubernetes.is_file() else None,
                             components if components.is_file() else None, kind_of)
    return telemetry


def _load_network_run(telemetry: Telemetry, run_dir: Path) -> None:
    request = _find_file(run_dir, "istio_request_bytes.query_range.json.gz", "istio_request_bytes.query_range.json")
    response = _find_file(run_dir, "istio_response_bytes.query_range.json.gz", "istio_response_bytes.query_range.json")
    if request and response:
        telemetry.request_bytes, telemetry.response_bytes = load_edge_bytes(request, response)
    else:
        telemetry.request_bytes, telemetry.response_bytes = load_edge_bytes(run_dir / "edge_bytes.csv")
    calls = run_dir / "api_calls.csv"
    if calls.is_file():
        telemetry.api_calls = load_api_calls_csv(calls)
    else:
        telemetry.api_calls = calls_for_byte_series(
            telemetry.traces, telemetry.request_bytes, f"{run_dir} (no api_calls.csv)",
            f"{calls} (timestamp + one column per API, calls per trailing {WINDOW_S:.0f}-s window) for the byte "
            "series' period, or traces recorded during it")


def load_live(config: AtlasConfig, prometheus_url: str | None, jaeger_url: str | None,
              start: float, end: float, step_s: float = 5.0, traces_from: list[str] | None = None) -> Telemetry:
    """Query Prometheus (bytes, calls, resources) and Jaeger (traces) over [start, end] (Unix s).

    Traces come from Jaeger when `jaeger_url` is given, else from the files in `traces_from`.
    """
    live = config.live
    if jaeger_url:
        traces = JaegerClient(jaeger_url).all_traces(int(start * 1e6), int(end * 1e6), int(live["jaeger_limit"]))
    elif traces_from:
        traces = load_traces(traces_from)
    else:
        raise AtlasInputError("live telemetry", "needs traces: give a Jaeger URL or trace files")
    telemetry = Telemetry(traces=traces)
    if not prometheus_url:
        warn_data("live telemetry", "no Prometheus URL: footprint and resource forecast are unavailable; "
                  "API call rates are counted from the traces' root spans")
        telemetry.api_calls = api_calls_from_traces(traces, step_s)
        return telemetry

    def fill(template: str) -> str:
        return template.replace("{namespace}", str(live["namespace"])).replace("{window}", str(live["window"]))

    prom = PrometheusClient(prometheus_url)
    telemetry.request_bytes = prom.query_sum([fill(q) for q in live["request_bytes"]], start, end, step_s, edge_key)
    telemetry.response_bytes = prom.query_sum([fill(q) for q in live["response_bytes"]], start, end, step_s, edge_key)
    if live.get("api_calls"):
        telemetry.api_calls = prom.query_range(fill(live["api_calls"]), start, end, step_s, label_key(live["api_label"]))
    else:
        telemetry.api_calls = calls_for_byte_series(
            traces, telemetry.request_bytes, f"{prometheus_url} (live.api_calls is not set)",
            "live.api_calls (a PromQL query of per-API call counts, keyed by live.api_label) or traces of the "
            "queried period")
    metrics = {metric: prom.query_range(fill(query), start, end, step_s, component_key)
               for metric, query in live["resources"].items() if query}
    if "cpu_cores" in metrics and "memory_bytes" in metrics:
        telemetry.resource_runs = [ResourceRun(f"live {prometheus_url}", metrics)]
    else:
        warn_data(prometheus_url, "live.resources lacks cpu_cores or memory_bytes queries: no live resource run")
    return telemetry


def telemetry_until(telemetry: Telemetry, end: float) -> Telemetry:
    """A copy whose byte and call series stop at `end` (Unix s); traces and resource runs are kept."""
    def cut(table: SeriesTable | None) -> SeriesTable | None:
        return table.window(None, end) if table is not None else None

    return Telemetry(telemetry.traces, cut(telemetry.request_bytes), cut(telemetry.response_bytes),
                     cut(telemetry.api_calls), telemetry.resource_runs, telemetry.component_info, telemetry.window_s)
