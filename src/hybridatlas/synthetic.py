"""Synthetic telemetry in the real formats, for demos, tests and scale benchmarks.

By default a small shop application (frontend, three services, MongoDB, Redis, memcached) with three
APIs; `random_app(n)` makes applications of any size with the call-graph shapes production traces show
(random_app's docstring).
Writes the same layout as the DeathStarBench data: traces/ (Jaeger JSON), network-run/ (Istio-style
query_range JSON for request/response bytes, the same as edge_bytes.csv, api_calls.csv),
resources-run/ (resources.csv and prometheus/*.query_range.json.gz), components.json, and
truth.json with the bytes per call the generator used (to check the footprint fit against).
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STEP_S = 5
WINDOW_S = 60
NAMESPACE = "shop"

# Component -> kind; the default database rules map `<x>-service` Mongo/Redis/Mmc spans to `<x>-mongodb` etc.
COMPONENTS = {
    "web-frontend": "frontend", "catalog-service": "service", "cart-service": "service",
    "order-service": "service", "catalog-mongodb": "mongodb", "catalog-memcached": "memcached",
    "cart-redis": "redis", "order-mongodb": "mongodb",
}
STATEFUL = {"catalog-mongodb", "order-mongodb", "cart-redis"}

# Call trees: (component, operation, duration_ms, [stages of children]); stages run in sequence.
API_TREES: dict[str, tuple] = {
    "/api/catalog/browse": ("web-frontend", "/api/catalog/browse", 1.0, [[
        ("catalog-service", "ListItems", 0.6, [[("catalog-service", "MmcGetItems", 0.4, [])],
                                               [("catalog-service", "MongoFindItems", 1.2, [])]])]]),
    "/api/cart/add": ("web-frontend", "/api/cart/add", 0.8, [[
        ("cart-service", "AddToCart", 0.5, [[("cart-service", "RedisUpdate", 0.5, []),
                                             ("catalog-service", "GetItem", 0.4, [[("catalog-service", "MmcGetItems", 0.3, [])]])]])]]),
    "/api/order/checkout": ("web-frontend", "/api/order/checkout", 1.2, [[
        ("order-service", "Checkout", 0.8, [[("cart-service", "GetCart", 0.4, [[("cart-service", "RedisGet", 0.4, [])]])],
                                            [("order-service", "MongoInsertOrder", 1.5, [])]])]]),
}
BASE_RATES = {"/api/catalog/browse": 12.0, "/api/cart/add": 4.0, "/api/order/checkout": 1.5}
# True (request, response) bytes per API call on each edge.
TRUE_BYTES = {
    ("istio-ingressgateway", "web-frontend"): {"/api/catalog/browse": (900, 12000), "/api/cart/add": (1100, 400),
                                               "/api/order/checkout": (1500, 600)},
    ("web-frontend", "catalog-service"): {"/api/catalog/browse": (200, 9000)},
    ("web-frontend", "cart-service"): {"/api/cart/add": (300, 60)},
    ("web-frontend", "order-service"): {"/api/order/checkout": (500, 90)},
    ("catalog-service", "catalog-memcached"): {"/api/catalog/browse": (150, 7000), "/api/cart/add": (80, 900)},
    ("catalog-service", "catalog-mongodb"): {"/api/catalog/browse": (300, 8500)},
    ("cart-service", "cart-redis"): {"/api/cart/add": (250, 30), "/api/order/checkout": (90, 1200)},
    ("cart-service", "catalog-service"): {"/api/cart/add": (120, 950)},
    ("order-service", "cart-service"): {"/api/order/checkout": (100, 1250)},
    ("order-service", "order-mongodb"): {"/api/order/checkout": (1800, 120)},
}
CPU_PER_BYTE = {c: 2e-7 if COMPONENTS.get(c) == "service" else 1e-7 for c in COMPONENTS}


@dataclass
class App:
    """What the generator writes telemetry for: components and kinds, call trees per API, calls/s per
    API, true (request, response) bytes per API call per edge, CPU seconds per byte per component."""

    components: dict[str, str]
    stateful: set[str]
    api_trees: dict[str, tuple]
    base_rates: dict[str, float]
    true_bytes: dict[tuple[str, str], dict[str, tuple[float, float]]]
    cpu_per_byte: dict[str, float]


SHOP = App(COMPONENTS, STATEFUL, API_TREES, BASE_RATES, TRUE_BYTES, CPU_PER_BYTE)


def _span_tree(rng: np.random.Generator, node: tuple, start_us: int, trace_id: str, parent: str | None,
               spans: list[dict], pids: dict[str, str], counter: list[int]) -> int:
    """Append spans for `node` starting at start_us; returns its end time."""
    component, operation, own_ms, stages = node
    counter[0] += 1
    span_id = f"{counter[0]:016x}"
    pid = pids.setdefault(component, f"p{len(pids) + 1}")
    clock = start_us + int(rng.gamma(4.0, own_ms * 250.0 / 4.0)) + 20
    for stage in stages:
        ends = [_span_tree(rng, child, clock + int(rng.integers(5, 40)), trace_id, span_id, spans, pids, counter)
                for child in stage]
        clock = max(ends) + int(rng.integers(10, 60))
    end = clock + int(rng.gamma(4.0, own_ms * 250.0 / 4.0))
    spans.append({"traceID": trace_id, "spanID": span_id, "operationName": operation,
                  "references": [] if parent is None else [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent}],
                  "startTime": start_us, "duration": end - start_us, "tags": [], "logs": [], "processID": pid,
                  "warnings": None, "flags": 1})
    return end


def write_traces(out: Path, rng: np.random.Generator, traces_per_api: int, start_s: float, app: App = SHOP) -> None:
    (out / "traces").mkdir(parents=True, exist_ok=True)
    for a, (api, tree) in enumerate(app.api_trees.items()):
        traces = []
        for i in range(traces_per_api):
            trace_id = f"{a:04x}{i:012x}"
            spans: list[dict] = []
            pids: dict[str, str] = {}
            _span_tree(rng, tree, int((start_s + i * 0.7 + a * 0.1) * 1e6), trace_id, None, spans, pids, [0])
            processes = {pid: {"serviceName": component, "tags": [
                {"key": "container.name", "type": "string", "value": component},
                {"key": "pod.name", "type": "string", "value": f"{component}-5d9c7b8f6d-x2x4z"}]}
                for component, pid in pids.items()}
            traces.append({"traceID": trace_id, "spans": spans, "processes": processes, "warnings": None})
        name = api.strip("/").replace("/", "-")
        (out / "traces" / f"{name}.json").write_text(json.dumps(
            {"data": traces, "total": 0, "limit": 0, "offset": 0, "errors": None}), encoding="utf-8")


def _load_pattern(times: np.ndarray, rng: np.random.Generator, app: App = SHOP) -> np.ndarray:
    """Per-API calls/s: daily-like sinusoid with per-API phase and period, and noise."""
    phase = np.linspace(0, np.pi, len(app.base_rates))
    period = 1200.0 * (1.0 + 0.37 * np.arange(len(app.base_rates)) % 1.7)
    t = times - times[0]
    return np.array([rate * (1.0 + 0.6 * np.sin(2 * np.pi * t / T + p)) * rng.uniform(0.9, 1.1, len(times))
                     for rate, p, T in zip(app.base_rates.values(), phase, period)]).T


def _window_counts(per_second: np.ndarray) -> np.ndarray:
    """Trailing 60-s window counts on the 5-s grid (overlapping, like the real data)."""
    per_step = per_second * STEP_S
    k = WINDOW_S // STEP_S
    cumulative = np.vstack([np.zeros((1, per_step.shape[1])), np.cumsum(per_step, axis=0)])
    counts = cumulative[k:] - cumulative[:-k]
    return np.round(np.vstack([cumulative[1:k], counts]))


def _query_range(name: str, series: dict[Any, np.ndarray], times: np.ndarray, labels_of) -> dict:
    result = [{"metric": {"__name__": name, **labels_of(key)},
               "values": [[int(t), f"{v:.10g}"] for t, v in zip(times, values)]} for key, values in series.items()]
    return {"status": "success", "data": {"resultType": "matrix", "result": result}}


def _edge_labels(edge: tuple[str, str]) -> dict[str, str]:
    source, destination = edge
    return {"reporter": "source", "source_workload": source, "source_app": source,
            "source_workload_namespace": "istio-system" if source == "istio-ingressgateway" else NAMESPACE,
            "destination_workload": destination, "destination_app": destination,
            "destination_workload_namespace": NAMESPACE, "request_protocol": "tcp"}


def write_network_run(out: Path, rng: np.random.Generator, times: np.ndarray, app: App = SHOP) -> dict[str, np.ndarray]:
    run = out / "network-run"
    run.mkdir(parents=True, exist_ok=True)
    apis = list(app.base_rates)
    calls = _window_counts(_load_pattern(times, rng, app))
    request, response = {}, {}
    for edge, per_api in app.true_bytes.items():
        req = sum(calls[:, apis.index(api)] * b[0] for api, b in per_api.items())
        resp = sum(calls[:, apis.index(api)] * b[1] for api, b in per_api.items())
        request[edge] = np.maximum(req * rng.normal(1.0, 0.03, len(times)), 0.0)
        response[edge] = np.maximum(resp * rng.normal(1.0, 0.03, len(times)), 0.0)
    for name, series in (("istio_request_bytes", request), ("istio_response_bytes", response)):
        with gzip.open(run / f"{name}.query_range.json.gz", "wt", encoding="utf-8") as handle:
            json.dump(_query_range(name, series, times, _edge_labels), handle)
    with open(run / "edge_bytes.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "source", "destination", "request_bytes", "response_bytes"])
        for i, t in enumerate(times):
            for edge in app.true_bytes:
                writer.writerow([int(t), edge[0], edge[1], f"{request[edge][i]:.2f}", f"{response[edge][i]:.2f}"])
    with open(run / "api_calls.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", *apis])
        for t, row in zip(times, calls):
            writer.writerow([int(t), *(int(v) for v in row)])
    return {"calls": calls}


def write_resource_run(out: Path, rng: np.random.Generator, times: np.ndarray, app: App = SHOP) -> None:
    run = out / "resources-run"
    (run / "prometheus").mkdir(parents=True, exist_ok=True)
    apis = list(app.base_rates)
    per_second = _load_pattern(times, rng, app) * 1.5
    traffic = {c: np.zeros(len(times)) for c in app.components}
    for edge, per_api in app.true_bytes.items():
        volume = sum(per_second[:, apis.index(api)] * (b[0] + b[1]) for api, b in per_api.items())
        for component in edge:
            if component in traffic:
                traffic[component] += volume * 1.05 + 800.0
    metrics = {
        "cpu_cores": {c: 0.01 + app.cpu_per_byte[c] * traffic[c] * rng.normal(1, 0.05, len(times)) for c in app.components},
        "memory_rss_bytes": {c: 7e7 + 2e2 * traffic[c] + rng.normal(0, 1e6, len(times)) for c in app.components},
        "network_receive_bytes_per_second": {c: traffic[c] / 2 for c in app.components},
        "network_transmit_bytes_per_second": {c: traffic[c] / 2 for c in app.components},
        "disk_usage_gb": {c: 0.5 + np.cumsum(traffic[c]) * STEP_S * 2e-10 for c in sorted(app.stateful)},
    }
    names = {"cpu_cores": "pod:container_cpu_usage_seconds:rate1m", "memory_rss_bytes": "container_memory_rss",
             "network_receive_bytes_per_second": "pod:container_network_receive_bytes:rate1m",
             "network_transmit_bytes_per_second": "pod:container_network_transmit_bytes:rate1m",
             "disk_usage_gb": "openebs_actual_used"}
    for stem, series in metrics.items():
        document = _query_range(names[stem], series, times,
                                lambda c: {"namespace": NAMESPACE, "pod": f"{c}-7f8d9c6b5-abcde", "container": c})
        with gzip.open(run / "prometheus" / f"{stem}.query_range.json.gz", "wt", encoding="utf-8") as handle:
            json.dump(document, handle)
    with open(run / "resources.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "component", "cpu_cores", "memory_bytes", "disk_usage_gb",
                         "net_rx_bytes_per_second", "net_tx_bytes_per_second"])
        for i, t in enumerate(times):
            for c in app.components:
                disk = f"{metrics['disk_usage_gb'][c][i]:.6f}" if c in app.stateful else ""
                writer.writerow([int(t), c, f"{metrics['cpu_cores'][c][i]:.6f}", int(metrics["memory_rss_bytes"][c][i]),
                                 disk, f"{traffic[c][i] / 2:.1f}", f"{traffic[c][i] / 2:.1f}"])


def generate(out: Path, seed: int = 0, traces_per_api: int = 50, minutes: float = 60.0, app: App | None = None) -> Path:
    """Write a complete synthetic data directory under `out` (the shop app unless `app` is given); returns `out`."""
    app = app or SHOP
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    start = 1_700_000_000
    times = np.arange(start, start + minutes * 60 + 1, STEP_S, dtype=np.int64)
    write_traces(out, rng, traces_per_api, float(start), app)
    write_network_run(out, rng, times, app)
    write_resource_run(out, rng, times + int(minutes * 60) + 3600, app)
    components = [{"name": c, "kind": k, "stateful": c in app.stateful} for c, k in app.components.items()]
    (out / "components.json").write_text(json.dumps(
        {"namespace": NAMESPACE, "gateway": {"name": "istio-ingressgateway"}, "components": components}, indent=1),
        encoding="utf-8")
    truth = {f"{s}->{d}": {api: {"request": b[0], "response": b[1]} for api, b in per_api.items()}
             for (s, d), per_api in app.true_bytes.items()}
    (out / "truth.json").write_text(json.dumps(truth, indent=1), encoding="utf-8")
    return out


def random_app(n_components: int, seed: int = 0) -> App:
    """An application of about `n_components` with the shapes production call graphs show (Alibaba's
    2021 microservice traces, Luo et al. SoCC'21): call trees rather than DAGs, most of depth <= 4, a
    heavy-tailed fan-out (a few hub services called by many others), about a third of the components
    stateful stores owned by one service each (caches in front of databases), and many APIs sharing
    the hubs. Frontends (2% of components) each serve several APIs; APIs are about a tenth of the
    components."""
    rng = np.random.default_rng(seed)
    n_frontends = max(1, n_components // 50)
    n_stores = int(round(0.3 * n_components))
    n_services = max(2, n_components - n_frontends - n_stores)
    services = [f"svc{i:04d}-service" for i in range(n_services)]
    components = {f"web{i:02d}-frontend": "frontend" for i in range(n_frontends)}
    components.update({s: "service" for s in services})
    owned: dict[str, list[str]] = {s: [] for s in services}
    store_kinds = (("mongodb", 0.45), ("redis", 0.3), ("memcached", 0.25))
    for k in range(n_stores):
        owner = services[int(rng.integers(n_services))]
        kind = store_kinds[int(rng.choice(3, p=[w for _, w in store_kinds]))][0]
        name = f"{owner[:-len('-service')]}-{kind}" if not any(o.endswith(kind) for o in owned[owner]) \
            else f"{owner[:-len('-service')]}-{k}-{kind}"
        owned[owner].append(name)
        components[name] = kind
    stateful = {c for c, k in components.items() if k in ("mongodb", "redis")}
    frontends = [c for c, k in components.items() if k == "frontend"]
    n_apis = max(3, n_components // 10)
    unused = list(rng.permutation(services))
    popularity = np.ones(n_services)
    callees_of: dict[str, list[str]] = {}
    trees, rates, true_bytes = {}, {}, {}

    def pick(exclude: set[str]) -> str:
        """An unused service first (every service serves some API), else a popular one (hubs)."""
        fresh = [candidate for candidate in unused if candidate not in exclude]
        if fresh:
            return str(fresh[-1])
        weights = np.array([0.0 if s in exclude else popularity[i] for i, s in enumerate(services)])
        chosen = int(rng.choice(n_services, p=weights / weights.sum()))
        popularity[chosen] += 1.0
        return services[chosen]

    def expand(service: str, api: str, depth: int, budget: list[int], path: set[str]) -> tuple:
        if service in unused:
            unused.remove(service)
        stages: list[list[tuple]] = []
        for store in owned[service]:  # the cache before the database, each its own stage
            prefix = {"mongodb": "Mongo", "redis": "Redis", "memcached": "Mmc"}[components[store]]
            _bytes(true_bytes, (service, store), api, rng)
            stages.append([(service, f"{prefix}{store.split('-')[-2].title()}", float(rng.gamma(2.0, 0.3)), [])])
        if service not in callees_of:  # a service keeps its dependencies across APIs
            fan_out = min(int(rng.geometric(0.45)) - 1 + (budget[0] > 2), 6) if depth < 5 else 0
            callees_of[service] = [pick(path | {service}) for _ in range(fan_out)]
        callees = [c for c in callees_of[service] if c not in path and budget[0] > 0 and rng.random() < 0.85]
        while callees:
            width = int(rng.integers(1, len(callees) + 1))
            stage = []
            for callee in callees[:width]:
                budget[0] -= 1
                _bytes(true_bytes, (service, callee), api, rng)
                stage.append(expand(callee, api, depth + 1, budget, path | {service}))
            stages.append(stage)
            callees = callees[width:]
        return (service, f"{service[:-len('-service')].title()}Op", float(rng.gamma(2.0, 0.4)), stages)

    a = 0
    while a < n_apis or unused:  # more APIs until every service serves one
        frontend = frontends[a % len(frontends)]
        api = f"/api/{frontend[:-len('-frontend')]}/op{a:03d}"
        root_service = pick(set())
        _bytes(true_bytes, ("istio-ingressgateway", frontend), api, rng)
        _bytes(true_bytes, (frontend, root_service), api, rng)
        budget = [-(-len(unused) // max(1, n_apis - a)) + int(rng.lognormal(1.0, 0.8))]
        trees[api] = (frontend, api, float(rng.gamma(2.0, 0.5)), [[expand(root_service, api, 1, budget, set())]])
        rates[api] = float(rng.lognormal(0.5, 1.0))
        a += 1
    cpu = {c: (2e-7 if k in ("service", "frontend") else 1e-7) * float(rng.uniform(0.5, 2.0)) for c, k in components.items()}
    used = {c for edge in true_bytes for c in edge} - {"istio-ingressgateway"}
    components = {c: k for c, k in components.items() if c in used}
    return App(components, stateful & set(components), trees, rates, true_bytes, {c: cpu[c] for c in components})


def _bytes(table: dict, edge: tuple[str, str], api: str, rng: np.random.Generator) -> None:
    """Draw (request, response) bytes per call for an API on an edge once (log-normal sizes)."""
    if api not in table.setdefault(edge, {}):
        table[edge][api] = (float(rng.lognormal(6.0, 1.0)), float(rng.lognormal(7.0, 1.5)))
