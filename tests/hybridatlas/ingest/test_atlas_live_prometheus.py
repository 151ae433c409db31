"""The live path against a REAL Prometheus server (Debian package `prometheus`, see conftest.py) loaded
with the shared data as precomputed gauges: file values must come back exactly. The default PromQL
queries are tested in test_atlas_live_default_queries.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from hybridatlas.cli import main
from hybridatlas.config import AtlasConfig
from hybridatlas.ingest.csvfiles import load_api_calls_csv, load_edge_bytes_csv
from hybridatlas.ingest.dataset import load_live, load_resource_run
from hybridatlas.ingest.live import PrometheusClient
from hybridatlas.ingest.prometheus import component_key

ISTIO_START, ISTIO_END = 1659247140, 1659259260
LIVE_CONFIG = {"live": {
    "request_bytes": ["atlas_edge_request_bytes"], "response_bytes": ["atlas_edge_response_bytes"],
    "api_calls": "atlas_api_calls", "api_label": "api",
    "resources": {"cpu_cores": None, "memory_bytes": None, "net_rx_bytes_per_s": None,
                  "net_tx_bytes_per_s": None, "disk_gib": None}}}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def write_openmetrics(data_dir: Path, path: Path) -> None:
    """Edge bytes, API calls and one resource run's CPU as OpenMetrics gauges (one family at a time)."""
    run = data_dir / "istio-run-20220731"
    request, response = load_edge_bytes_csv(run / "edge_bytes.csv")
    calls = load_api_calls_csv(run / "api_calls.csv")
    cpu = load_resource_run(data_dir / "resources-run-20220617").metrics["cpu_cores"]
    with path.open("w", encoding="utf-8") as out:
        for family, table, labels in (
                ("atlas_edge_request_bytes", request, lambda e: f'source_workload="{e[0]}",destination_workload="{e[1]}"'),
                ("atlas_edge_response_bytes", response, lambda e: f'source_workload="{e[0]}",destination_workload="{e[1]}"'),
                ("atlas_api_calls", calls, lambda api: f'api="{_escape(api)}"'),
                ("atlas_pod_cpu_cores", cpu, lambda c: f'namespace="social-network",pod="{c}-6d5f7c9b8d-q2w3e"')):
            out.write(f"# TYPE {family} gauge\n")
            for k, name in enumerate(table.names):
                label_text = labels(name)
                for t, v in zip(table.timestamps, table.values[:, k]):
                    if not np.isnan(v):
                        out.write(f"{family}{{{label_text}}} {v} {int(t)}\n")
        out.write("# EOF\n")


@pytest.fixture(scope="module")
def prometheus_url(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, start_prometheus) -> str:
    source = tmp_path_factory.mktemp("openmetrics") / "data.om"
    write_openmetrics(data_dir, source)
    return start_prometheus(source)


def test_live_bytes_and_calls_equal_the_files(prometheus_url, data_dir):
    config = AtlasConfig.load(overrides=LIVE_CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        telemetry = load_live(config, prometheus_url, None, ISTIO_START, ISTIO_END, 5.0,
                              [str(data_dir / "traces")])
    request, response = load_edge_bytes_csv(data_dir / "istio-run-20220731" / "edge_bytes.csv")
    assert telemetry.request_bytes.names == request.names
    assert telemetry.request_bytes.timestamps.tolist() == request.timestamps.tolist()
    np.testing.assert_allclose(telemetry.request_bytes.values, request.values)
    np.testing.assert_allclose(telemetry.response_bytes.values, response.values)
    calls = load_api_calls_csv(data_dir / "istio-run-20220731" / "api_calls.csv")
    np.testing.assert_allclose(telemetry.api_calls.select(calls.names), calls.values)


def test_long_ranges_are_split_below_the_points_limit(prometheus_url, data_dir):
    cpu_file = load_resource_run(data_dir / "resources-run-20220617").metrics["cpu_cores"]
    client = PrometheusClient(prometheus_url)
    live = client.query_range("atlas_pod_cpu_cores", 1655494800, 1655499600, 1.0, component_key)  # 4801 points
    assert sorted(live.names) == sorted(cpu_file.names)
    on_grid = np.isin(live.timestamps, cpu_file.timestamps)
    np.testing.assert_allclose(live.select(cpu_file.names)[on_grid], cpu_file.values)


def test_cli_evaluate_from_live_prometheus(prometheus_url, data_dir, tmp_path, capsys):
    config = tmp_path / "live.json"
    config.write_text(json.dumps(LIVE_CONFIG))
    code = main(["evaluate", "--prometheus", prometheus_url, "--traces", str(data_dir / "traces"),
                 "--resources", str(data_dir / "resources-run-20220617"), str(data_dir / "resources-run-20220803"),
                 "--start", str(ISTIO_START), "--end", str(ISTIO_END), "--config", str(config),
                 "--cloud", "media-mongodb", "--json"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["disrupted_apis"] == ["/get-media", "/upload-media"]
    assert plan["cost"]["egress"] > 0


def test_unreachable_server_is_a_clear_error(closed_port):
    from hybridatlas.errors import AtlasInputError
    with pytest.raises(AtlasInputError, match="cannot reach the server"):
        PrometheusClient(f"http://127.0.0.1:{closed_port}", timeout_s=2).query_range("up", 0, 10, 5, component_key)


def test_watch_live_polls_prometheus(prometheus_url, data_dir):
    from hybridatlas.watch import watch_live

    config = AtlasConfig.load(overrides={**LIVE_CONFIG, "onprem": {"cpu_cores": 0.6}})
    runs = [load_resource_run(data_dir / name) for name in ("resources-run-20220617", "resources-run-20220803")]

    def load(start: float, end: float):
        telemetry = load_live(config, prometheus_url, None, start, end, 5.0, [str(data_dir / "traces")])
        telemetry.resource_runs = runs
        return telemetry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = watch_live(load, config, 0.0, 2, [], follow=True, clock=lambda: float(ISTIO_END))
    assert first["plan"] == [] and first["status"] == "stops fitting the forecast"
    assert "onprem_cpu_cores" in first["violations"] and first["recommended"]
    assert second["plan"] == first["recommended"] and second["status"] == "ok"
