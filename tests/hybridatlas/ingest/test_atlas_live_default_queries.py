"""The live path with the DEFAULT configuration: the packaged Istio and cAdvisor PromQL (with {namespace}
and {window} substituted) against a real Prometheus server (see conftest.py) backfilled with cumulative
counters under the real metric names, generated from the synthetic generator's data.

Each 5-s sample of the generator's byte and resource series becomes one counter increment, so with
samples on the query grid `increase(...[1m])` at t is the sum of the increments in (t - 60 s, t] and
`rate(...[1m])` that sum over 60 s; gauges come back as written. Decoy series (another namespace, the
pod-level cAdvisor series without a container, the destination reporter) must be filtered out.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Hashable

import numpy as np
import pytest

from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasDataWarning, AtlasInputError
from hybridatlas.ingest.dataset import load_live, load_resource_run
from hybridatlas.ingest.live import PrometheusClient
from hybridatlas.ingest.prometheus import edge_key, load_query_range
from hybridatlas.ingest.series import SeriesTable

STEP_S = 5
WINDOW_SAMPLES = 12  # the default live.window, 1m, over 5-s samples
GATEWAY_EDGE = ("istio-ingressgateway", "web-frontend")  # HTTP: Istio's request/response byte histograms
POD_SUFFIX = "-7f8d9c6b5-abcde"


def _labels(pairs: dict[str, str]) -> str:
    return ",".join(f'{key}="{value}"' for key, value in pairs.items())


def _family(out, name: str, kind: str, series: list[tuple[str, dict[str, str], np.ndarray, np.ndarray]]) -> None:
    """One OpenMetrics family: (sample name, labels, timestamps, values) per series."""
    out.write(f"# TYPE {name} {kind}\n")
    for sample, labels, times, values in series:
        for t, v in zip(times, values):
            out.write(f"{sample}{{{_labels(labels)}}} {float(v)!r} {int(t)}\n")


def _counter(table: SeriesTable, name: Hashable, per_sample: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps and a counter that grows by each sample (times `per_sample`)."""
    column = np.nan_to_num(table.column(name)) * per_sample
    return table.timestamps, np.cumsum(column)


def _edge(edge: tuple[str, str], **extra: str) -> dict[str, str]:
    return {"reporter": "source", "source_workload": edge[0], "destination_workload": edge[1], **extra}


def write_counters(synthetic_dir: Path, namespace: str, path: Path) -> None:
    """The generator's network and resource runs as Istio and cAdvisor counters and gauges."""
    network = synthetic_dir / "network-run"
    request = load_query_range(network / "istio_request_bytes.query_range.json.gz", edge_key)
    response = load_query_range(network / "istio_response_bytes.query_range.json.gz", edge_key)
    tcp_edges = [edge for edge in request.names if edge != GATEWAY_EDGE]
    resources = load_resource_run(synthetic_dir / "resources-run").metrics
    components = resources["cpu_cores"].names
    with path.open("w", encoding="utf-8") as out:
        for name, table in (("istio_tcp_received_bytes", request), ("istio_tcp_sent_bytes", response)):
            series = [(f"{name}_total", _edge(edge), *_counter(table, edge)) for edge in tcp_edges]
            decoy = {**_edge(tcp_edges[0]), "reporter": "destination"}
            _family(out, name, "counter", series + [(f"{name}_total", decoy, *_counter(table, tcp_edges[0], 3.0))])
        for name, table in (("istio_request_bytes", request), ("istio_response_bytes", response)):
            times, total = _counter(table, GATEWAY_EDGE)
            ok = _edge(GATEWAY_EDGE, response_code="200")
            failed = _edge(GATEWAY_EDGE, response_code="503")
            count = np.arange(1, len(times) + 1, dtype=float)
            _family(out, name, "histogram", [
                (f"{name}_bucket", {**ok, "le": "+Inf"}, times, count), (f"{name}_count", ok, times, count),
                (f"{name}_sum", ok, times, total), (f"{name}_bucket", {**failed, "le": "+Inf"}, times, count),
                (f"{name}_count", failed, times, count), (f"{name}_sum", failed, times, total)])
        pods = {c: {"namespace": namespace, "pod": f"{c}{POD_SUFFIX}"} for c in components}
        cpu = resources["cpu_cores"]
        _family(out, "container_cpu_usage_seconds", "counter",
                [("container_cpu_usage_seconds_total", {**pods[c], "container": c}, *_counter(cpu, c, STEP_S))
                 for c in components]
                + [("container_cpu_usage_seconds_total", pods[components[0]], *_counter(cpu, components[0], STEP_S)),
                   ("container_cpu_usage_seconds_total", {**pods[components[0]], "namespace": "other", "container": "x"},
                    *_counter(cpu, components[0], STEP_S))])
        memory = resources["memory_bytes"]
        _family(out, "container_memory_rss", "gauge",
                [("container_memory_rss", {**pods[c], "container": c}, memory.timestamps, memory.column(c))
                 for c in components])
        for name, metric in (("container_network_receive_bytes", "net_rx_bytes_per_s"),
                             ("container_network_transmit_bytes", "net_tx_bytes_per_s")):
            _family(out, name, "counter", [(f"{name}_total", {**pods[c], "interface": "eth0"},
                                            *_counter(resources[metric], c, STEP_S)) for c in components])
        out.write("# EOF\n")


def trailing(table: SeriesTable, name: Hashable, divide_by: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps with a full 1-minute window behind them, and the windowed sum (over `divide_by`)."""
    total = np.cumsum(np.nan_to_num(table.column(name)))
    return table.timestamps[WINDOW_SAMPLES:], (total[WINDOW_SAMPLES:] - total[:-WINDOW_SAMPLES]) / divide_by


def assert_on(live: SeriesTable, name: Hashable, times: np.ndarray, expected: np.ndarray) -> None:
    rows = np.searchsorted(live.timestamps, times)
    assert (live.timestamps[rows] == times).all(), name
    np.testing.assert_allclose(live.column(name)[rows], expected, rtol=1e-9, atol=1e-9, err_msg=str(name))


@pytest.fixture(scope="module")
def live(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory,
         start_prometheus: Callable[[Path], str]) -> tuple[str, float, float]:
    source = tmp_path_factory.mktemp("counters") / "counters.om"
    write_counters(synthetic_dir, AtlasConfig.load().live["namespace"], source)
    network = load_query_range(synthetic_dir / "network-run" / "istio_request_bytes.query_range.json.gz", edge_key)
    resources = load_resource_run(synthetic_dir / "resources-run").metrics["cpu_cores"]
    return start_prometheus(source), float(network.timestamps[0]), float(resources.timestamps[-1])


def test_default_queries_load_bytes_and_resources(live, synthetic_dir):
    url, start, end = live
    config = AtlasConfig.load()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        telemetry = load_live(config, url, None, start, end, STEP_S, [str(synthetic_dir / "traces")])
    messages = [str(w.message) for w in caught if issubclass(w.category, AtlasDataWarning)]
    assert any("live.api_calls is not set" in m and "counting calls from the traces' root spans" in m for m in messages)

    network = synthetic_dir / "network-run"
    for direction, live_table in (("request", telemetry.request_bytes), ("response", telemetry.response_bytes)):
        table = load_query_range(network / f"istio_{direction}_bytes.query_range.json.gz", edge_key)
        assert live_table.names == table.names  # TCP edges and the HTTP gateway edge, summed per key
        for edge in table.names:
            assert_on(live_table, edge, *trailing(table, edge))

    (run,) = telemetry.resource_runs
    files = load_resource_run(synthetic_dir / "resources-run").metrics
    assert set(run.metrics) == {"cpu_cores", "memory_bytes", "net_rx_bytes_per_s", "net_tx_bytes_per_s"}
    assert run.metrics["cpu_cores"].names == files["cpu_cores"].names  # pods -> components, decoys filtered
    for component in files["cpu_cores"].names:
        for metric in ("cpu_cores", "net_rx_bytes_per_s", "net_tx_bytes_per_s"):
            assert_on(run.metrics[metric], component, *trailing(files[metric], component, WINDOW_SAMPLES))
        memory = files["memory_bytes"]
        assert_on(run.metrics["memory_bytes"], component, memory.timestamps, memory.column(component))
    assert telemetry.api_calls is not None and len(telemetry.api_calls.timestamps) > 0


def test_a_summed_query_that_returns_nothing_is_dropped_with_a_warning(live):
    url, start, end = live
    client = PrometheusClient(url)
    tcp = AtlasConfig.load().live["request_bytes"][0].replace("{window}", "1m")
    alone = client.query_range(tcp, start, end, STEP_S, edge_key)
    with pytest.warns(AtlasDataWarning, match=r"query=absent_metric_total: no series between .* left out of the sum"):
        summed = client.query_sum([tcp, "absent_metric_total"], start, end, STEP_S, edge_key)
    assert summed.names == alone.names
    np.testing.assert_array_equal(summed.values, alone.values)
    with pytest.raises(AtlasInputError, match="no series between"):
        client.query_sum(["absent_metric_total", "another_absent_metric"], start, end, STEP_S, edge_key)
