"""The Jaeger client against a small real HTTP server (stdlib http.server on loopback) that serves
the shared trace files in the shape of Jaeger's query API: GET /api/services and
GET /api/traces?service=&start=&end=&limit= (times in microseconds; services are process
serviceNames). There is no Jaeger Debian package to run the real query service in CI."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from hybridatlas.cli import main
from hybridatlas.errors import AtlasDataWarning, AtlasInputError
from hybridatlas.ingest.files import read_json
from hybridatlas.ingest.live import JaegerClient


def _services(trace: dict) -> set[str]:
    return {process["serviceName"] for process in trace["processes"].values()}


def make_handler(traces: list[dict]):
    class JaegerQueryHandler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/api/services":
                names = sorted({s for trace in traces for s in _services(trace)})
                self._send(200, {"data": names, "total": len(names), "limit": 0, "offset": 0, "errors": None})
            elif url.path == "/api/traces":
                if "service" not in query:
                    self._send(400, {"data": None, "total": 0, "limit": 0, "offset": 0,
                                     "errors": [{"code": 400, "msg": "parameter 'service' is required"}]})
                    return
                start, end = int(query.get("start", 0)), int(query.get("end", 2**62))
                hits = [t for t in traces if query["service"] in _services(t)
                        and start <= min(s["startTime"] for s in t["spans"]) <= end]
                hits = hits[: int(query.get("limit", 20))]
                self._send(200, {"data": hits, "total": 0, "limit": 0, "offset": 0, "errors": None})
            else:
                self._send(404, {"errors": [{"code": 404, "msg": "not found"}]})

        def log_message(self, *args) -> None:
            pass

    return JaegerQueryHandler


@pytest.fixture(scope="module")
def jaeger_url(data_dir: Path):
    traces = [t for f in sorted((data_dir / "traces").glob("*.json")) for t in read_json(f)["data"]]
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(traces))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_services_and_traces(jaeger_url, telemetry):
    client = JaegerClient(jaeger_url)
    services = client.services()
    assert "sn-nginx" in services and "sn-user-service" in services
    login = client.traces("sn-user-service", limit=5)
    assert len(login) == 5 and all("user-service" in {s.component for s in t.spans} for t in login)


def test_all_traces_deduplicates_across_services(jaeger_url, telemetry):
    traces = JaegerClient(jaeger_url).all_traces(limit=10_000)
    assert sorted(t.trace_id for t in traces) == sorted(t.trace_id for t in telemetry.traces)


def test_time_window_filters(jaeger_url):
    client = JaegerClient(jaeger_url)
    assert client.traces("sn-nginx", start_us=0, end_us=1_000_000, limit=100) == []


def test_http_errors_are_clear(jaeger_url):
    with pytest.raises(AtlasInputError, match="HTTP 404"):
        JaegerClient(jaeger_url + "/nope").services()


def test_hitting_the_trace_limit_is_warned(jaeger_url):
    with pytest.warns(AtlasDataWarning, match=r"services \[.*'sn-nginx'.*\] returned the limit of 5 traces"):
        JaegerClient(jaeger_url).all_traces(limit=5)


def test_cli_trace_limit_is_configurable(jaeger_url, telemetry, capsys):
    starts = [trace.root.start_us / 1e6 for trace in telemetry.traces]
    assert main(["evaluate", "--jaeger", jaeger_url, "--start", str(math.floor(min(starts))),
                 "--end", str(math.ceil(max(starts))), "--jaeger-limit", "3", "--cloud", "", "--json"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "returned the limit of 3 traces" in err and "raise live.jaeger_limit (--jaeger-limit)" in err
