import json
from pathlib import Path

import pytest

from hybridatlas.errors import AtlasDataWarning, AtlasInputError
from hybridatlas.ingest.jaeger import parse_traces
from hybridatlas.ingest.traces import load_traces

API_OF_FILE = {"compose": "/wrk2-api/post/compose", "getmedia": "/get-media", "login": "/wrk2-api/user/login"}


def test_real_exports_give_100_traces_per_api(telemetry):
    counts = {}
    for trace in telemetry.traces:
        counts[trace.api] = counts.get(trace.api, 0) + 1
    assert len(counts) == 9 and set(counts.values()) == {100}


def test_components_come_from_container_name(data_dir):
    traces = load_traces([data_dir / "traces" / "original-login.json"])
    components = {span.component for trace in traces for span in trace.spans}
    assert components == {"nginx-thrift", "user-service"}
    assert all(trace.root.parent_id is None and trace.api == API_OF_FILE["login"] for trace in traces)


def _trace(spans, processes=None):
    return {"traceID": "t1", "spans": spans, "processes": processes or {
        "p1": {"serviceName": "svc", "tags": [{"key": "container.name", "value": "a-service"}]}}}


def _span(span_id, parent=None, start=0, duration=10):
    return {"spanID": span_id, "operationName": f"op{span_id}", "startTime": start, "duration": duration,
            "processID": "p1", "references": [] if parent is None else [{"refType": "CHILD_OF", "spanID": parent}]}


def test_bad_trace_is_skipped_with_a_warning_naming_the_file():
    good = _trace([_span("1"), _span("2", "1")])
    orphan = _trace([_span("1"), _span("3", "missing")])
    with pytest.warns(AtlasDataWarning, match=r"f\.json: skipped a trace: trace t1: span 3 references missing parent"):
        traces = parse_traces("f.json", {"data": [good, orphan]})
    assert len(traces) == 1


def test_two_roots_and_missing_fields_are_reported():
    with pytest.raises(AtlasInputError, match="no usable trace"):
        with pytest.warns(AtlasDataWarning, match="expected one root span, found 2"):
            parse_traces("x.json", {"data": [_trace([_span("1"), _span("2")])]})
    broken = _span("1")
    del broken["startTime"]
    with pytest.raises(AtlasInputError):
        with pytest.warns(AtlasDataWarning, match="lacks field"):
            parse_traces("x.json", {"data": [_trace([broken])]})


def test_malformed_files_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AtlasInputError, match=r"bad\.json: not valid JSON"):
        load_traces([bad])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"status": "success"}))
    with pytest.raises(AtlasInputError, match=r"wrong\.json: not a trace document: expected Jaeger JSON"):
        load_traces([wrong])
    with pytest.raises(AtlasInputError, match="trace file not found"):
        load_traces([tmp_path / "absent.json"])


def test_missing_container_tag_falls_back_to_service_name_with_warning():
    trace = _trace([_span("1")], {"p1": {"serviceName": "frontend", "tags": []}})
    with pytest.warns(AtlasDataWarning, match="using serviceName 'frontend'"):
        (parsed,) = parse_traces("f.json", {"data": [trace]})
    assert parsed.root.component == "frontend"


def test_empty_trace_file_is_warned(tmp_path: Path):
    empty = tmp_path / "api-cart-add.json"
    empty.write_text(json.dumps({"data": []}))
    full = tmp_path / "other.json"
    full.write_text(json.dumps({"data": [_trace([_span("1")])]}))
    with pytest.warns(AtlasDataWarning, match=r"api-cart-add\.json: holds no traces"):
        traces = load_traces([empty, full])
    assert len(traces) == 1
