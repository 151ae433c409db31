import gzip
import json

import numpy as np
import pytest

from hybridatlas.errors import AtlasDataWarning, AtlasInputError
from hybridatlas.ingest.csvfiles import load_api_calls_csv, load_edge_bytes_csv, load_resources_csv
from hybridatlas.ingest.dataset import api_calls_from_traces, load_resource_run
from hybridatlas.ingest.prometheus import component_from_pod, edge_key, load_query_range, parse_query_range
from hybridatlas.ingest.series import SeriesTable, align


def test_query_range_json_equals_the_csv(data_dir):
    run = data_dir / "istio-run-20220731"
    request_json = load_query_range(run / "istio_request_bytes.query_range.json.gz", edge_key)
    request_csv, response_csv = load_edge_bytes_csv(run / "edge_bytes.csv")
    assert len(request_json.names) == 40 and len(request_json.timestamps) == 2425
    assert request_json.names == request_csv.names
    np.testing.assert_allclose(request_json.values, request_csv.values)
    response_json = load_query_range(run / "istio_response_bytes.query_range.json.gz", edge_key)
    np.testing.assert_allclose(response_json.values, response_csv.values)


def test_resource_json_equals_the_csv(data_dir):
    run = data_dir / "resources-run-20220617"
    from_json = load_resource_run(run)
    from_csv = load_resources_csv(run / "resources.csv")
    for metric in ("cpu_cores", "memory_bytes", "disk_gib", "net_rx_bytes_per_s"):
        assert from_json.metrics[metric].names == from_csv[metric].names
        np.testing.assert_allclose(from_json.metrics[metric].values, from_csv[metric].values, rtol=1e-6)
    assert len(from_csv["disk_gib"].names) == 10  # only PVC components have disk series


def test_api_calls_csv_and_counting_from_traces(data_dir, telemetry):
    calls = load_api_calls_csv(data_dir / "istio-run-20220731" / "api_calls.csv")
    assert len(calls.names) == 9 and calls.values.shape == (2425, 9)
    counted = api_calls_from_traces(telemetry.traces)
    # 100 traces per API were captured within about a minute: the peak window holds most of them
    assert counted.values.max(axis=0).min() >= 50 and counted.values.max() <= 100


def test_pod_names_map_to_deployments():
    assert component_from_pod("nginx-thrift-5857966d44-xh7tc") == "nginx-thrift"
    assert component_from_pod("user-service") == "user-service"


def test_error_response_and_unkeyed_series():
    with pytest.raises(AtlasInputError, match="not a successful Prometheus response"):
        parse_query_range("q", {"status": "error", "error": "bad query"}, edge_key)
    doc = {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"foo": "bar"}, "values": [[1, "1"]]},
        {"metric": {"source_workload": "a", "destination_workload": "b"}, "values": [[1, "2"], [6, "3"]]}]}}
    with pytest.warns(AtlasDataWarning, match="do not identify it"):
        table = parse_query_range("q", doc, edge_key)
    assert table.names == [("a", "b")] and table.values[:, 0].tolist() == [2.0, 3.0]


def test_csv_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "edges.csv"
    path.write_text("timestamp,source,destination,request_bytes\n1,a,b,3\n")
    with pytest.raises(AtlasInputError, match=r"edges\.csv: CSV lacks column\(s\) \['response_bytes'\]"):
        load_edge_bytes_csv(path)
    path.write_text("timestamp,source,destination,request_bytes,response_bytes\n1,a,b,3,x\n")
    with pytest.raises(AtlasInputError, match=r"line 2: column 'response_bytes' is not a number: 'x'"):
        load_edge_bytes_csv(path)
    gz = tmp_path / "broken.json.gz"
    gz.write_bytes(b"not gzip")
    with pytest.raises(AtlasInputError, match=r"broken\.json\.gz: not valid JSON"):
        load_query_range(gz, edge_key)


def test_inconsistent_time_ranges():
    a = SeriesTable(np.array([0, 5, 10]), ["x"], np.ones((3, 1)), "a.json")
    b = SeriesTable(np.array([100, 105]), ["y"], np.ones((2, 1)), "b.csv")
    with pytest.raises(AtlasInputError, match=r"a\.json and b\.csv: time ranges do not overlap"):
        align(a, b)
    c = SeriesTable(np.array([5, 10, 15]), ["y"], np.ones((3, 1)), "c.csv")
    with pytest.warns(AtlasDataWarning, match="only 2 of 3 timestamps overlap"):
        left, right = align(a, c)
    assert left.timestamps.tolist() == [5, 10] == right.timestamps.tolist()


def test_gzip_and_plain_json_read_the_same(tmp_path, data_dir):
    source = data_dir / "resources-run-20220803" / "prometheus" / "cpu_cores.query_range.json.gz"
    plain = tmp_path / "cpu.json"
    plain.write_text(json.dumps(json.load(gzip.open(source))))
    from hybridatlas.ingest.prometheus import component_key
    np.testing.assert_array_equal(load_query_range(plain, component_key).values,
                                  load_query_range(source, component_key).values)


def test_calls_from_traces_follow_a_given_grid(telemetry):
    starts = [trace.root.start_us / 1e6 for trace in telemetry.traces]
    grid = np.arange(int(min(starts)) - 58, int(max(starts)) + 120, 5)  # offset from the default 5-s grid
    calls = api_calls_from_traces(telemetry.traces, grid=grid)
    assert np.isin(calls.timestamps, grid).all()
    assert calls.values.sum(axis=0).tolist() == [12 * 100] * 9  # every root in exactly 60 s / 5 s windows
