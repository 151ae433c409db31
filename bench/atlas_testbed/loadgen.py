"""Open-loop load on one keep-alive connection: requests start at the times of a Poisson process (mean
gap `--gap-s`), in a random order of APIs, so calls on every edge arrive like a Poisson stream at the
same rate whatever the placement does to latency (a request due while the previous one runs starts
when it ends). Records each request's start, API and client-side latency."""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from telemetry import ByteCounter  # noqa: E402

UPLOAD = bytes(random.Random(1).getrandbits(8) for _ in range(100 * 1024))


def api_requests(rng: random.Random) -> dict[str, tuple[str, str, dict]]:
    """API name (the entry span's name) -> (method, path, requests kwargs) for the next call."""
    user = rng.randrange(50)
    return {
        "GET /user/profile": ("GET", "/user/profile", {"params": {"user": user}}),
        "GET /timeline/read": ("GET", "/timeline/read", {"params": {"user": user}}),
        "POST /post/compose": ("POST", "/post/compose", {"json": {"user": user, "text": "x" * 280}}),
        "GET /media/get": ("GET", "/media/get", {"params": {"media": rng.randrange(5)}}),
        "POST /media/upload": ("POST", "/media/upload", {"data": UPLOAD}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--requests", type=int, default=30, help="requests per API")
    parser.add_argument("--gap-s", type=float, default=0.25, help="mean time between request starts")
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests per API first")
    args = parser.parse_args()
    topology = json.loads(Path(args.topology).read_text())
    out = Path(args.out)
    counter = ByteCounter("gateway", {(a, int(p)): c for c, (a, p) in topology.items()}, out / "gateway.bytes.jsonl")
    counter.install()
    counter.start_sampling()
    address, port = topology["frontend"]
    session, rng = requests.Session(), random.Random(0)
    apis = list(api_requests(rng))
    for api in apis * args.warmup:
        method, path, kwargs = api_requests(rng)[api]
        session.request(method, f"http://{address}:{port}{path}", timeout=60, **kwargs).raise_for_status()
    rows = []
    order = apis * args.requests
    rng.shuffle(order)
    due = time.perf_counter()
    for api in order:
        due += rng.expovariate(1.0 / args.gap_s)
        time.sleep(max(0.0, due - time.perf_counter()))
        method, path, kwargs = api_requests(rng)[api]
        start = time.time()
        clock = time.perf_counter()
        session.request(method, f"http://{address}:{port}{path}", timeout=60, **kwargs).raise_for_status()
        rows.append((start, api, (time.perf_counter() - clock) * 1e3))
    counter.write()
    with open(out / "client.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["start", "api", "latency_ms"])
        writer.writerows(rows)


if __name__ == "__main__":
    main()
