"""Times store and RPC operations from the client side; run inside a namespace by calibrate.stores.

`python -m hybridatlas.calibrate.probe --redis HOST:PORT --memcached HOST:PORT --http HOST:PORT
--sizes 100,50000 --reps 5 --idle-s 0.3` prints one JSON object: {operation: {size: [ms, ...]}} plus
the request and response payload bytes of each (operation, size).

Each operation moves `size` payload bytes in total (a pipeline of 10 commands moves size/10 each). With
`--idle-s` the client waits that long before each timed operation, several of TCP's retransmission
timeouts, so the connection restarts from its initial window as a pooled connection does after an
idle spell (each timeout of idle halves the window down to the initial one).
"""

from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import redis
import requests
from pymemcache.client.base import Client as MemcacheClient

BATCH = 10
ECHO_SCRIPT = "return redis.call('GET', KEYS[1])"


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def redis_operations(client: redis.Redis, size: int) -> dict[str, tuple[Callable[[], object], int, int]]:
    """name -> (operation, request payload bytes, response payload bytes)."""
    value, part = b"v" * size, b"v" * max(1, size // BATCH)
    client.set("probe:value", value)
    for k in range(BATCH):
        client.set(f"probe:part:{k}", part)
    sha = client.script_load(ECHO_SCRIPT)

    def pipeline_get() -> object:
        pipe = client.pipeline(transaction=False)
        for k in range(BATCH):
            pipe.get(f"probe:part:{k}")
        return pipe.execute()

    def multi_set() -> object:
        pipe = client.pipeline(transaction=True)
        for k in range(BATCH):
            pipe.set(f"probe:part:{k}", part)
        return pipe.execute()

    return {"redis GET": (lambda: client.get("probe:value"), 0, size),
            "redis SET": (lambda: client.set("probe:value", value), size, 0),
            "redis pipeline (10 GETs)": (pipeline_get, 0, size),
            "redis MULTI/EXEC (10 SETs)": (multi_set, size, 0),
            "redis EVALSHA (Lua)": (lambda: client.evalsha(sha, 1, "probe:value"), 0, size)}


def memcached_operations(client: MemcacheClient, size: int) -> dict[str, tuple[Callable[[], object], int, int]]:
    value, part = b"v" * size, b"v" * max(1, size // BATCH)
    client.set("probe:value", value, noreply=False)
    keys = [f"probe:part:{k}" for k in range(BATCH)]
    for key in keys:
        client.set(key, part, noreply=False)
    return {"memcached get": (lambda: client.get("probe:value"), 0, size),
            "memcached get_many (10 keys)": (lambda: client.get_many(keys), 0, size),
            "memcached set": (lambda: client.set("probe:value", value, noreply=False), size, 0)}


def http_operations(session: requests.Session, base: str, size: int) -> dict[str, tuple[Callable[[], object], int, int]]:
    body = b"v" * size
    return {"http GET (keep-alive)": (lambda: session.get(f"{base}/bytes/{size}").content, 0, size),
            "http POST (keep-alive)": (lambda: session.post(f"{base}/echo-length", data=body).content, size, 0)}


def serve_http(address: str) -> None:
    """A keep-alive HTTP/1.1 server with TCP_NODELAY: GET /bytes/N answers N bytes, POST answers the length."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            return None

        def reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self.reply(b"v" * int(self.path.rsplit("/", 1)[-1]))

        def do_POST(self) -> None:
            self.reply(str(len(self.rfile.read(int(self.headers["Content-Length"])))).encode())

    host, port = _host_port(address)
    server = ThreadingHTTPServer((host, port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-http", help="run the HTTP server side at HOST:PORT instead")
    parser.add_argument("--redis")
    parser.add_argument("--memcached")
    parser.add_argument("--http")
    parser.add_argument("--sizes", default="100")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=0.0)
    args = parser.parse_args()
    if args.serve_http:
        serve_http(args.serve_http)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    clients = []
    if args.redis:
        host, port = _host_port(args.redis)
        store = redis.Redis(host=host, port=port, socket_timeout=30)
        clients.append(lambda size: redis_operations(store, size))
    if args.memcached:
        cache = MemcacheClient(_host_port(args.memcached), timeout=30)
        clients.append(lambda size: memcached_operations(cache, size))
    if args.http:
        session = requests.Session()
        clients.append(lambda size: http_operations(session, f"http://{args.http}", size))
    timings: dict[str, dict[str, list[float]]] = {}
    payload: dict[str, dict[str, list[int]]] = {}
    for size in sizes:
        for make in clients:
            for name, (operation, request_bytes, response_bytes) in make(size).items():
                operation()  # connection set up, script loaded
                samples = []
                for _ in range(args.reps):
                    if args.idle_s:
                        time.sleep(args.idle_s)
                    start = time.perf_counter()
                    operation()
                    samples.append((time.perf_counter() - start) * 1e3)
                timings.setdefault(name, {})[str(size)] = samples
                payload.setdefault(name, {})[str(size)] = [request_bytes, response_bytes]
    print(json.dumps({"timings_ms": timings, "payload_bytes": payload}))


if __name__ == "__main__":
    main()
