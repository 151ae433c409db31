"""OTLP JSON (collector file exporter) and Zipkin v2 traces give the same span trees, call graphs and
latency model as the Jaeger export they were converted from; bad input names the file and the problem."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from hybridatlas.errors import AtlasDataWarning, AtlasInputError
from hybridatlas.ingest.traces import load_traces
from hybridatlas.models.callgraph import build_call_graphs
from hybridatlas.models.latency import build_latency_model

FILES = ["original-compose.json", "original-getmedia.json", "original-login.json"]


def _jaeger(data_dir):
    return {name: json.loads((data_dir / "traces" / name).read_text())["data"] for name in FILES}


def _component(trace, span):
    tags = {t["key"]: t["value"] for t in trace["processes"][span["processID"]]["tags"]}
    return tags["container.name"]


def _parent(span):
    return span["references"][0]["spanID"] if span["references"] else ""


def to_otlp_lines(traces, per_component_files: bool) -> dict[str, list[dict]]:
    """Collector file-exporter lines: one ExportTraceServiceRequest per trace and component (hex ids, ns strings)."""
    files: dict[str, list[dict]] = {}
    for trace in traces:
        by_component: dict[str, list[dict]] = {}
        for span in trace["spans"]:
            start = span["startTime"] * 1000
            by_component.setdefault(_component(trace, span), []).append({
                "traceId": trace["traceID"].rjust(32, "0"), "spanId": span["spanID"].rjust(16, "0"),
                "parentSpanId": _parent(span).rjust(16, "0") if _parent(span) else "", "name": span["operationName"],
                "kind": 2, "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + span["duration"] * 1000),
                "attributes": [{"key": "http.route", "value": {"stringValue": "x"}}], "status": {}})
        for component, spans in by_component.items():
            line = {"resourceSpans": [{"resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "svc"}},
                {"key": "k8s.deployment.name", "value": {"stringValue": component}}]},
                "scopeSpans": [{"scope": {"name": "test"}, "spans": spans}]}]}
            files.setdefault(component if per_component_files else "all", []).append(line)
    return files


def to_zipkin(traces) -> list[list[dict]]:
    return [[{"traceId": trace["traceID"].rjust(32, "0"), "id": s["spanID"].rjust(16, "0"),
              **({"parentId": _parent(s).rjust(16, "0")} if _parent(s) else {}), "name": s["operationName"],
              "timestamp": s["startTime"], "duration": s["duration"],
              "localEndpoint": {"serviceName": _component(trace, s)}} for s in trace["spans"]] for trace in traces]


def _graphs_and_latency(traces, config, components):
    graphs = build_call_graphs(traces, config)
    model = build_latency_model(traces, components, config, None, graphs)
    plans = np.random.default_rng(0).random((64, len(components))) < 0.4
    return graphs, model.mean_ms(plans), model.p95_ms(plans[:4])


def test_otlp_and_zipkin_equal_the_jaeger_export(data_dir, config, tmp_path):
    jaeger = _jaeger(data_dir)
    everything = [t for traces in jaeger.values() for t in traces]
    otlp_dir, zipkin_file = tmp_path / "otlp", tmp_path / "zipkin.json"
    otlp_dir.mkdir()
    for component, lines in to_otlp_lines(everything, per_component_files=True).items():
        (otlp_dir / f"{component}.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    zipkin_file.write_text(json.dumps(to_zipkin(everything)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = load_traces([data_dir / "traces" / name for name in FILES])
    converted = {"otlp": load_traces([otlp_dir]), "zipkin": load_traces([zipkin_file])}
    components = sorted({s.component for t in reference for s in t.spans} | {
        "istio-ingressgateway", "media-mongodb", "user-memcached", "user-mongodb", "post-storage-mongodb",
        "compose-post-redis", "home-timeline-redis", "write-home-timeline-rabbitmq", "url-shorten-mongodb",
        "user-timeline-redis", "user-timeline-mongodb", "social-graph-redis", "social-graph-mongodb",
        "post-storage-memcached", "url-shorten-memcached"})
    expected = _graphs_and_latency(reference, config, components)
    for name, traces in converted.items():
        assert len(traces) == len(reference) == 300, name
        graphs, mean, p95 = _graphs_and_latency(traces, config, components)
        assert {a: g.calls for a, g in graphs.items()} == {a: g.calls for a, g in expected[0].items()}, name
        np.testing.assert_allclose(mean, expected[1], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(p95, expected[2], rtol=1e-6, err_msg=name)


def _otlp_span(span_id, parent, name, kind, start_ms, end_ms, trace="5b8efff798038103d269b633813fc60c", attrs=None):
    return {"traceId": trace, "spanId": span_id, "parentSpanId": parent, "name": name, "kind": kind,
            "startTimeUnixNano": str(int(start_ms * 1e6)), "endTimeUnixNano": str(int(end_ms * 1e6)),
            "attributes": [{"key": k, "value": v} for k, v in (attrs or {}).items()]}


def _resource(service, spans, **extra):
    attributes = [{"key": "service.name", "value": {"stringValue": service}}]
    attributes += [{"key": k, "value": {"stringValue": v}} for k, v in extra.items()]
    return {"resourceSpans": [{"resource": {"attributes": attributes}, "scopeSpans": [{"spans": spans}]}]}


def test_collector_lines_across_files_with_store_clients(tmp_path: Path):
    front = _resource("frontend", [
        _otlp_span("eee19b7ec3c1b174", "", "GET /cart", 2, 0, 10),
        _otlp_span("eee19b7ec3c1b175", "eee19b7ec3c1b174", "GET /items", 3, 1, 9,
                   attrs={"server.address": {"stringValue": "cart.shop.svc.cluster.local"}})])
    cart = _resource("cart", [
        _otlp_span("eee19b7ec3c1b176", "eee19b7ec3c1b175", "GET /items", "SPAN_KIND_SERVER", 2, 8,
                   attrs={"http.request.body.size": {"intValue": "0"}, "http.response.body.size": {"intValue": "5120"}}),
        _otlp_span("eee19b7ec3c1b177", "eee19b7ec3c1b176", "HGETALL", 3, 3, 5,
                   attrs={"db.system.name": {"stringValue": "redis"}, "server.address": {"stringValue": "cart-redis"},
                          "server.port": {"intValue": "6379"}, "request_size": {"intValue": "45"},
                          "response_size": {"intValue": "4990"}})])
    (tmp_path / "a.jsonl").write_text(json.dumps(front) + "\n")
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps(cart) + "\n")
    (trace,) = load_traces([tmp_path])
    assert trace.api == "GET /cart" and trace.duration_ms == 10.0 and len(trace.spans) == 4
    client = trace.root.children[0]
    assert (client.kind, client.peer, client.children[0].component) == ("client", "cart.shop.svc.cluster.local", "cart")
    store = client.children[0].children[0]
    assert (store.kind, store.peer, store.duration_us) == ("client", "cart-redis", 2000)
    assert (store.request_bytes, store.response_bytes) == (45, 4990)  # the sidecar's wire bytes
    assert (client.children[0].request_bytes, client.children[0].response_bytes) == (0, 5120)  # HTTP body sizes
    assert (client.request_bytes, trace.root.response_bytes) == (None, None)


def test_base64_ids_and_k8s_workload_names_are_understood(tmp_path: Path):
    import base64
    trace_id = base64.b64encode(bytes.fromhex("5b8efff798038103d269b633813fc60c")).decode()
    span = _otlp_span(base64.b64encode(bytes.fromhex("eee19b7ec3c1b174")).decode(), "", "GET /", 2, 0, 1, trace=trace_id)
    (tmp_path / "t.json").write_text(json.dumps(_resource("web", [span], **{"k8s.deployment.name": "web-frontend"})))
    (trace,) = load_traces([tmp_path / "t.json"])
    assert trace.trace_id == "5b8efff798038103d269b633813fc60c" and trace.root.span_id == "eee19b7ec3c1b174"
    assert trace.root.component == "web-frontend"


def test_zipkin_shared_spans_split_into_client_and_server(tmp_path: Path):
    spans = [
        {"traceId": "a1", "id": "1", "name": "get /", "kind": "SERVER", "timestamp": 0, "duration": 10000,
         "localEndpoint": {"serviceName": "frontend"}},
        {"traceId": "a1", "id": "2", "parentId": "1", "name": "get /items", "kind": "CLIENT", "timestamp": 1000,
         "duration": 8000, "localEndpoint": {"serviceName": "frontend"}, "remoteEndpoint": {"serviceName": "cart"}},
        {"traceId": "a1", "id": "2", "parentId": "1", "name": "get /items", "kind": "SERVER", "shared": True,
         "timestamp": 2000, "duration": 6000, "localEndpoint": {"serviceName": "cart"}},
        {"traceId": "a1", "id": "3", "parentId": "2", "name": "get", "kind": "CLIENT", "timestamp": 3000,
         "duration": 2000, "localEndpoint": {"serviceName": "cart"}, "remoteEndpoint": {"serviceName": "redis"},
         "tags": {"request_size": "31", "response_size": "70000"}}]
    (tmp_path / "z.json").write_text(json.dumps(spans))
    (trace,) = load_traces([tmp_path / "z.json"])
    client = trace.root.children[0]
    server = client.children[0]
    assert (client.component, client.kind, server.component, server.kind) == ("frontend", "client", "cart", "server")
    assert server.children[0].peer == "redis" and server.children[0].component == "cart"
    assert (server.children[0].request_bytes, server.children[0].response_bytes) == (31, 70000)


def test_bad_otlp_and_zipkin_input_names_file_and_problem(tmp_path: Path):
    no_name = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [
        _otlp_span("eee19b7ec3c1b174", "", "GET /", 2, 0, 1)]}]}]}
    (tmp_path / "anon.jsonl").write_text(json.dumps(no_name) + "\n")
    with pytest.raises(AtlasInputError, match=r"anon\.jsonl: a resource has none of the attributes"):
        load_traces([tmp_path / "anon.jsonl"])
    good = json.dumps(_resource("web", [_otlp_span("eee19b7ec3c1b174", "", "GET /", 2, 0, 1)]))
    (tmp_path / "broken.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(AtlasInputError, match=r"broken\.jsonl: not valid JSON"):
        load_traces([tmp_path / "broken.jsonl"])
    orphan = _resource("web", [_otlp_span("eee19b7ec3c1b174", "", "GET /", 2, 0, 1),
                               _otlp_span("eee19b7ec3c1b175", "eee19b7ec3c1b179", "x", 1, 0, 1,
                                          trace="00000000000000000000000000000001")])
    (tmp_path / "partial.jsonl").write_text(json.dumps(orphan) + "\n")
    with pytest.warns(AtlasDataWarning, match="skipped a trace: trace 0+1: span eee19b7ec3c1b175 references missing parent"):
        assert len(load_traces([tmp_path / "partial.jsonl"])) == 1
    sized = _resource("web", [_otlp_span("eee19b7ec3c1b174", "", "GET /", 2, 0, 1, attrs={"request_size": {"intValue": "-3"}})])
    (tmp_path / "sized.jsonl").write_text(json.dumps(sized) + "\n")
    with pytest.raises(AtlasInputError, match=r"sized\.jsonl: span has a malformed value \(negative size -3\)"):
        load_traces([tmp_path / "sized.jsonl"])
    (tmp_path / "zip.json").write_text(json.dumps([{"traceId": "1", "id": "1", "timestamp": 0}]))
    with pytest.raises(AtlasInputError, match=r"zip\.json: span 1 has no localEndpoint\.serviceName"):
        load_traces([tmp_path / "zip.json"])
