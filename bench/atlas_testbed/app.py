"""The testbed application: five Python HTTP services over Redis and memcached, traced with the
OpenTelemetry SDK. One process per service: `python app.py SERVICE --topology FILE --out DIR`.

APIs (entry: frontend)            what they do
  GET  /user/profile              user-service: memcached multi-get (profile + settings)
  GET  /timeline/read             timeline-service: Redis ZREVRANGE, then memcached multi-get of 10 posts
  POST /post/compose              compose-service: Redis MULTI/EXEC (id + post hash), memcached set,
                                  then timeline-service fans out to followers with a Lua script (EVALSHA)
  GET  /media/get                 media-service: GridFS-style read: the file document, then one GET per chunk
  POST /media/upload              media-service: GridFS-style write: chunks in one pipeline, then the file document

The topology file maps every component to (address, port); services bind their own and call the others'.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis
import requests
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from pymemcache.client.base import Client as MemcacheClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from telemetry import ByteCounter, ExportAtExit, OtlpJsonFileExporter  # noqa: E402

CHUNK_BYTES = 64 * 1024
MEDIA_BYTES = 160 * 1024
POST_BYTES = 600
PROFILE_BYTES = 2000
FOLLOWERS = 20
USERS = 50
FANOUT = """for i, key in ipairs(KEYS) do redis.call('ZADD', key, ARGV[1], ARGV[2]); redis.call('ZREMRANGEBYRANK', key, 0, -101) end
return #KEYS"""


class Service:
    """Shared plumbing: tracer, pooled clients per thread, traced calls."""

    def __init__(self, name: str, topology: dict[str, list], out: Path) -> None:
        self.name, self.topology = name, topology
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(ExportAtExit(OtlpJsonFileExporter(out / f"{name}.otlp.jsonl")))
        self.provider = provider
        self.tracer = provider.get_tracer("atlas-testbed")
        self.local = threading.local()
        servers = {(address, int(port)): component for component, (address, port) in topology.items()}
        self.bytes = ByteCounter(name, servers, out / f"{name}.bytes.jsonl")
        self.bytes.install()
        self.bytes.start_sampling()

    def address(self, component: str) -> tuple[str, int]:
        address, port = self.topology[component]
        return address, int(port)

    def http(self) -> requests.Session:
        if not hasattr(self.local, "http"):
            self.local.http = requests.Session()
        return self.local.http

    def call(self, component: str, method: str, path: str, **kwargs) -> dict:
        """HTTP call with a client span (body sizes as the HTTP semantic conventions name them); the
        trace context travels in the traceparent header."""
        address, port = self.address(component)
        with self.tracer.start_as_current_span(f"{method} {path}", kind=SpanKind.CLIENT, attributes={
                "http.request.method": method, "server.address": component, "server.port": port}) as span:
            headers: dict[str, str] = {}
            propagate.inject(headers)
            response = self.http().request(method, f"http://{address}:{port}{path}", headers=headers, timeout=30, **kwargs)
            response.raise_for_status()
            span.set_attribute("http.request.body.size", len(response.request.body or b""))
            span.set_attribute("http.response.body.size", len(response.content))
            return response.json()

    def redis(self, component: str) -> redis.Redis:
        clients = self.local.__dict__.setdefault("redis", {})
        if component not in clients:
            address, port = self.address(component)
            clients[component] = redis.Redis(host=address, port=port, socket_timeout=30)
        return clients[component]

    def memcached(self, component: str) -> MemcacheClient:
        clients = self.local.__dict__.setdefault("memcached", {})
        if component not in clients:
            clients[component] = MemcacheClient(self.address(component), timeout=30, connect_timeout=30)
        return clients[component]

    @contextlib.contextmanager
    def store_span(self, component: str, system: str, operation: str):
        """A database client span, attributes as the OpenTelemetry semantic conventions name them, plus
        the bytes the call sent and received on the wire as `request_size` / `response_size` (the tags
        Envoy puts on its spans; what a sidecar or an eBPF tracer sees per call)."""
        with self.tracer.start_as_current_span(operation, kind=SpanKind.CLIENT, attributes={
                "db.system.name": system, "db.operation.name": operation, "server.address": component,
                "server.port": self.address(component)[1]}) as span:
            sent, received = self.bytes.thread_totals(component)
            yield span
            now_sent, now_received = self.bytes.thread_totals(component)
            span.set_attribute("request_size", now_sent - sent)
            span.set_attribute("response_size", now_received - received)


def user_profile(svc: Service, query: dict) -> dict:
    user = int(query.get("user", 0))
    with svc.store_span("cache-memcached", "memcached", "get_many"):
        found = svc.memcached("cache-memcached").get_many([f"profile:{user}", f"settings:{user}"])
    return {"user": user, "bytes": sum(len(v) for v in found.values())}


def timeline_read(svc: Service, query: dict) -> dict:
    user = int(query.get("user", 0))
    with svc.store_span("timeline-redis", "redis", "ZREVRANGE"):
        ids = svc.redis("timeline-redis").zrevrange(f"timeline:{user}", 0, 9)
    keys = [f"post:{i.decode()}" for i in ids]
    with svc.store_span("cache-memcached", "memcached", "get_many"):
        posts = svc.memcached("cache-memcached").get_many(keys) if keys else {}
    return {"posts": len(posts)}


def timeline_fanout(svc: Service, body: dict) -> dict:
    store = svc.redis("timeline-redis")
    if not hasattr(svc.local, "fanout_sha"):
        svc.local.fanout_sha = store.script_load(FANOUT)
    keys = [f"timeline:{f}" for f in body["followers"]]
    with svc.store_span("timeline-redis", "redis", "EVALSHA"):
        store.evalsha(svc.local.fanout_sha, len(keys), *keys, body["ts"], body["post"])
    return {"fanout": len(keys)}


def post_compose(svc: Service, body: dict) -> dict:
    user = int(body.get("user", 0))
    text = body.get("text", "")
    with svc.store_span("timeline-redis", "redis", "MULTI"):
        pipe = svc.redis("timeline-redis").pipeline(transaction=True)
        pipe.incr("post:next")
        pipe.hset(f"user:{user}", "last_post_text", text)
        post_id = pipe.execute()[0]
    with svc.store_span("cache-memcached", "memcached", "set"):
        svc.memcached("cache-memcached").set(f"post:{post_id}", text.encode(), noreply=False)
    followers = [(user + k) % USERS for k in range(1, FOLLOWERS + 1)]
    svc.call("timeline-service", "POST", "/fanout", json={"followers": followers, "ts": post_id, "post": post_id})
    return {"post": post_id}


def media_get(svc: Service, query: dict) -> dict:
    store = svc.redis("media-redis")
    media = int(query.get("media", 0))
    with svc.store_span("media-redis", "redis", "HGETALL"):
        files = store.hgetall(f"fs.files:{media}")
    size = 0
    for n in range(int(files[b"chunks"])):
        with svc.store_span("media-redis", "redis", "GET"):
            size += len(store.get(f"fs.chunks:{media}:{n}"))
    return {"media": media, "bytes": size}


def media_upload(svc: Service, body: bytes) -> dict:
    store = svc.redis("media-redis")
    media = random.randrange(1_000_000, 2_000_000)
    chunks = [body[i:i + CHUNK_BYTES] for i in range(0, len(body), CHUNK_BYTES)]
    with svc.store_span("media-redis", "redis", "PIPELINE"):
        pipe = store.pipeline(transaction=False)
        for n, chunk in enumerate(chunks):
            pipe.set(f"fs.chunks:{media}:{n}", chunk, ex=120)
        pipe.execute()
    with svc.store_span("media-redis", "redis", "HSET"):
        store.hset(f"fs.files:{media}", mapping={"length": len(body), "chunks": len(chunks)})
    with svc.store_span("media-redis", "redis", "EXPIRE"):
        store.expire(f"fs.files:{media}", 120)
    return {"media": media, "chunks": len(chunks)}


def frontend(svc: Service, method: str, path: str, query: dict, body: bytes) -> dict:
    if path == "/user/profile":
        return svc.call("user-service", "GET", "/user", params=query)
    if path == "/timeline/read":
        return svc.call("timeline-service", "GET", "/timeline", params=query)
    if path == "/post/compose":
        return svc.call("compose-service", "POST", "/compose", data=body)
    if path == "/media/get":
        return svc.call("media-service", "GET", "/media", params=query)
    if path == "/media/upload":
        return svc.call("media-service", "POST", "/media", data=body)
    raise KeyError(path)


ROUTES = {
    "frontend": lambda svc, method, path, query, body: frontend(svc, method, path, query, body),
    "user-service": lambda svc, method, path, query, body: user_profile(svc, query),
    "timeline-service": lambda svc, method, path, query, body:
        timeline_fanout(svc, json.loads(body)) if method == "POST" else timeline_read(svc, query),
    "compose-service": lambda svc, method, path, query, body: post_compose(svc, json.loads(body)),
    "media-service": lambda svc, method, path, query, body:
        media_upload(svc, body) if method == "POST" else media_get(svc, query),
}


def serve(name: str, topology: dict[str, list], out: Path) -> None:
    svc = Service(name, topology, out)
    route = ROUTES[name]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # TCP_NODELAY, as production servers (nginx, Envoy, gRPC, Thrift) set it

        def log_message(self, *args) -> None:
            return None

        def handle_one(self, method: str) -> None:
            path, _, raw_query = self.path.partition("?")
            query = dict(item.split("=", 1) for item in raw_query.split("&") if "=" in item)
            length = int(self.headers.get("Content-Length") or 0)
            context = propagate.extract(dict(self.headers))
            with svc.tracer.start_as_current_span(f"{method} {path}", context=context, kind=SpanKind.SERVER,
                                                  attributes={"http.request.method": method, "url.path": path,
                                                              "http.request.body.size": length}) as span:
                body = self.rfile.read(length) if length else b""
                try:
                    payload, status = json.dumps(route(svc, method, path, query, body)).encode(), 200
                except KeyError:
                    payload, status = b'{"error": "not found"}', 404
                span.set_attribute("http.response.body.size", len(payload))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        def do_GET(self) -> None:
            self.handle_one("GET")

        def do_POST(self) -> None:
            self.handle_one("POST")

    address, port = svc.address(name)
    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    gc.freeze()  # what start-up allocated is never scanned again: shorter collections while serving
    print("ready", flush=True)
    server.serve_forever()
    svc.provider.shutdown()
    svc.bytes.write()


def seed(topology: dict[str, list]) -> None:
    """Users, timelines, posts and media files the read APIs find."""
    def client(component: str):
        address, port = topology[component]
        return address, int(port)

    timeline = redis.Redis(*client("timeline-redis"))
    cache = MemcacheClient(client("cache-memcached"))
    media = redis.Redis(*client("media-redis"))
    rng = random.Random(0)
    for user in range(USERS):
        cache.set(f"profile:{user}", bytes(rng.getrandbits(8) for _ in range(PROFILE_BYTES)), noreply=False)
        cache.set(f"settings:{user}", b"s" * 300, noreply=False)
        timeline.zadd(f"timeline:{user}", {str(1000 + user * 10 + k): user * 10 + k for k in range(10)})
        for k in range(10):
            cache.set(f"post:{1000 + user * 10 + k}", b"p" * POST_BYTES, noreply=False)
    timeline.set("post:next", 100_000)
    blob = bytes(rng.getrandbits(8) for _ in range(MEDIA_BYTES))
    chunks = [blob[i:i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)]
    for item in range(5):
        for n, chunk in enumerate(chunks):
            media.set(f"fs.chunks:{item}:{n}", chunk)
        media.hset(f"fs.files:{item}", mapping={"length": len(blob), "chunks": len(chunks)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=[*ROUTES, "seed"])
    parser.add_argument("--topology", required=True)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    topology = json.loads(Path(args.topology).read_text())
    if args.service == "seed":
        seed(topology)
    else:
        serve(args.service, topology, Path(args.out))


if __name__ == "__main__":
    main()
