"""Atlas's testbed: run the traced application all on-prem and under hybrid placements over an
emulated WAN, then compare Atlas's predictions (learned from the all-on-prem run only) with what was
measured, per API and placement.

    python bench/atlas_testbed/run.py --out /tmp/atlas-testbed [--size small|full] [--rtt-ms 20]

Needs root, iproute2, redis-server and memcached (Debian packages). Writes, per run, a data directory
Atlas reads (traces/*.otlp.jsonl, network-run/edge_bytes.csv + api_calls.csv, client.csv), and
results.json / results.md with measured vs predicted mean latency per API and placement.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from hybridatlas.config import AtlasConfig
from hybridatlas.emulation.netns import EmulatedWan
from hybridatlas.ingest.dataset import load_directory
from hybridatlas.ingest.traces import load_traces
from hybridatlas.pipeline import build_models
from hybridatlas.validate import validate

HERE = Path(__file__).resolve().parent
SERVICES = {"frontend": 8080, "user-service": 8081, "timeline-service": 8082, "compose-service": 8083, "media-service": 8084}
STORES = {"timeline-redis": 6379, "media-redis": 6380, "cache-memcached": 11211}
GATEWAY = "gateway"
WINDOW_S = 5  # trailing window of the byte and call series (Atlas: series_window_s)
# name -> (components in the cloud, ingress side)
PLACEMENTS = {
    "onprem-again": ([], "onprem"),
    "stores-in-cloud": (["timeline-redis", "media-redis"], "onprem"),
    "media-in-cloud": (["media-service", "media-redis"], "onprem"),
    "entry-in-cloud": (["frontend"], "onprem"),
    "services-in-cloud": (["user-service", "timeline-service", "compose-service", "cache-memcached"], "onprem"),
    "cloud-ingress": (["frontend", "user-service", "cache-memcached"], "cloud"),
}
SIZES = {"small": {"requests": 10, "placements": ["stores-in-cloud", "entry-in-cloud"]},
         "full": {"requests": 30, "placements": list(PLACEMENTS)}}
REALTIME_PRIORITY = 10  # SCHED_RR for stores, services and the load generator; the delay line runs above it


def config_overrides(rtt_ms: float, rate_mbit: float, ingress: str) -> dict:
    """Atlas's configuration for the testbed: its gateway, nothing pinned but the gateway, its WAN."""
    return {"gateway": GATEWAY, "ingress": ingress, "series_window_s": WINDOW_S,
            "wan": {"rtt_ms": rtt_ms, "bandwidth_gbps": rate_mbit / 1e3},
            "placement": {"pinned_onprem": [GATEWAY], "pinned_onprem_kinds": []}}


def _wait_port(address: str, port: int, wan: EmulatedWan, side: str, timeout_s: float = 10.0) -> None:
    probe = (f"import socket,time\nend=time.time()+{timeout_s}\nwhile True:\n try:\n  socket.create_connection(('{address}',{port}),1).close();break\n"
             f" except OSError:\n  assert time.time()<end,'{address}:{port} not listening';time.sleep(0.05)")
    subprocess.run(wan.command(side, [sys.executable, "-c", probe]), check=True)


def realtime_prefix() -> list[str]:
    """`chrt` to run the application's processes under SCHED_RR, so that other work on the machine does
    not stall them (they sleep between requests and use little CPU); empty where not permitted."""
    probe = subprocess.run(["chrt", "--rr", str(REALTIME_PRIORITY), "true"], capture_output=True) \
        if shutil.which("chrt") else None
    return ["chrt", "--rr", str(REALTIME_PRIORITY)] if probe is not None and probe.returncode == 0 else []


def store_command(name: str, address: str, port: int) -> list[str]:
    if name.endswith("-redis"):
        return ["redis-server", "--port", str(port), "--bind", address, "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--daemonize", "no", "--logfile", ""]
    return ["memcached", "-u", "root", "-l", address, "-p", str(port), "-U", "0", "-m", "64"]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(wan: EmulatedWan, cloud: list[str], ingress: str, requests: int, out: Path) -> Path:
    """Run the application under one placement; returns the data directory Atlas reads."""
    if out.exists():
        shutil.rmtree(out)
    raw = out / "raw"
    raw.mkdir(parents=True)
    side = {c: "cloud" if c in cloud else "onprem" for c in [*SERVICES, *STORES]}
    topology = {c: [wan.address(side[c]), port] for c, port in {**SERVICES, **STORES}.items()}
    (out / "topology.json").write_text(json.dumps({"topology": topology, "cloud": cloud, "ingress": ingress}))
    topology_file = str(out / "topology.json.plain")
    Path(topology_file).write_text(json.dumps(topology))
    processes: list[subprocess.Popen] = []
    realtime = realtime_prefix()
    try:
        for name, port in STORES.items():
            processes.append(subprocess.Popen(wan.command(side[name], [*realtime, *store_command(name, topology[name][0], port)]),
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for name, port in STORES.items():
            _wait_port(topology[name][0], port, wan, side[name])
        subprocess.run(wan.command("onprem", [sys.executable, str(HERE / "app.py"), "seed", "--topology", topology_file]),
                       check=True)
        services = {name: subprocess.Popen(wan.command(side[name], [*realtime, sys.executable, str(HERE / "app.py"), name,
                                                                    "--topology", topology_file, "--out", str(raw)]),
                                           stdout=subprocess.PIPE, text=True) for name in SERVICES}
        processes.extend(services.values())
        for name, process in services.items():
            if process.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError(f"{name} did not start")
        subprocess.run(wan.command(ingress, [*realtime, sys.executable, str(HERE / "loadgen.py"), "--topology", topology_file,
                                             "--out", str(raw), "--requests", str(requests)]), check=True)
    finally:
        _stop(processes[len(STORES):])
        _stop(processes[:len(STORES)])
    return write_dataset(raw, out)


def write_dataset(raw: Path, out: Path) -> Path:
    """traces/ (OTLP JSON lines of the timed phase), network-run/{edge_bytes,api_calls}.csv, client.csv."""
    with open(raw / "client.csv", encoding="utf-8") as handle:
        client = [(float(r["start"]), r["api"], float(r["latency_ms"])) for r in csv.DictReader(handle)]
    shutil.copy(raw / "client.csv", out / "client.csv")
    timed_from_ns = int(min(start for start, _, _ in client) * 1e9) - 1_000_000
    (out / "traces").mkdir()
    for path in sorted(raw.glob("*.otlp.jsonl")):
        with open(path, encoding="utf-8") as source, open(out / "traces" / path.name, "w", encoding="utf-8") as sink:
            for line in source:
                document = json.loads(line)
                for resource in document["resourceSpans"]:
                    for scope in resource["scopeSpans"]:
                        scope["spans"] = [s for s in scope["spans"] if int(s["startTimeUnixNano"]) >= timed_from_ns]
                sink.write(json.dumps(document) + "\n")
    samples: dict[tuple[str, str, str], list[tuple[float, int]]] = {}
    for path in raw.glob("*.bytes.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            samples.setdefault((row["source"], row["destination"], row["direction"]), []).append((row["t"], row["bytes"]))
    start, end = int(client[0][0]), int(client[-1][0]) + 2
    grid = np.arange(start, end + 1)

    def cumulative(points: list[tuple[float, int]], times: np.ndarray) -> np.ndarray:
        points.sort()
        t = np.array([p[0] for p in points])
        v = np.array([p[1] for p in points], dtype=float)
        index = np.searchsorted(t, times, side="right") - 1
        return np.where(index >= 0, v[np.maximum(index, 0)], 0.0)

    network = out / "network-run"
    network.mkdir()
    edges = sorted({(s, d) for s, d, _ in samples})
    with open(network / "edge_bytes.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "source", "destination", "request_bytes", "response_bytes"])
        windows = {}
        for s, d in edges:
            for direction in ("request", "response"):
                points = samples.get((s, d, direction), [])
                windows[(s, d, direction)] = (cumulative(points, grid) - cumulative(points, grid - WINDOW_S)) if points \
                    else np.zeros(len(grid))
        for i, t in enumerate(grid):
            for s, d in edges:
                writer.writerow([int(t), s, d, f"{windows[(s, d, 'request')][i]:.0f}", f"{windows[(s, d, 'response')][i]:.0f}"])
    apis = sorted({api for _, api, _ in client})
    starts = {api: np.sort([s for s, a, _ in client if a == api]) for api in apis}
    with open(network / "api_calls.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", *apis])
        for t in grid:
            writer.writerow([int(t), *(int(np.searchsorted(starts[a], t, side="right")
                                           - np.searchsorted(starts[a], t - WINDOW_S, side="right")) for a in apis)])
    return out


def client_means(data_dir: Path) -> dict[str, float]:
    with open(data_dir / "client.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {api: float(np.mean([float(r["latency_ms"]) for r in rows if r["api"] == api])) for api in sorted({r["api"] for r in rows})}


def compare(onprem: Path, runs: dict[str, Path], rtt_ms: float, rate_mbit: float) -> dict:
    """Atlas learns from the all-on-prem run and predicts every other run's per-API latency."""
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        telemetry = load_directory(onprem)
        for name, run in runs.items():
            placement = json.loads((run / "topology.json").read_text())
            models = build_models(telemetry, AtlasConfig.load(overrides=config_overrides(rtt_ms, rate_mbit, placement["ingress"])))
            report = validate(models, load_traces([run / "traces"]), placement["cloud"])
            client = client_means(run)
            user_view = models.latency.mean_ms(
                np.array([[c in placement["cloud"] for c in models.components]]), include_ingress=True)[0]
            for a, api in enumerate(models.apis):
                row = report["apis"][api]
                row["client_measured_mean_ms"] = client.get(api)
                row["client_predicted_mean_ms"] = float(user_view[a] + client_means(onprem)[api] - models.latency.baseline_mean_ms[a])
            results[name] = {"cloud": placement["cloud"], "ingress": placement["ingress"], **report}
    return results


def markdown(results: dict, meta: dict) -> str:
    lines = ["# Atlas testbed: measured vs predicted per-API mean latency", "",
             f"{meta['machine']}; WAN {meta['wan_mode']}: RTT {meta['rtt_ms']} ms, {meta['rate_mbit']} Mbit/s; "
             f"{meta['requests']} timed requests per API and run. Predictions use only the all-on-prem run. "
             "Latency is the entry span's (frontend server span) mean; error = (predicted - measured) / measured.", ""]
    for name, r in results.items():
        lines += [f"## {name}: cloud = {', '.join(r['cloud'])}; ingress {r['ingress']}", "",
                  f"mean |error| {100 * r['mean_abs_error']:.1f}%, worst {100 * r['max_abs_error']:.1f}%", "",
                  "| API | on-prem ms | measured ms | predicted ms | error |", "|---|---|---|---|---|"]
        for api, row in r["apis"].items():
            lines.append(f"| {api} | {row['onprem_mean_ms']:.1f} | {row['measured_mean_ms']:.1f} | "
                         f"{row['predicted_mean_ms']:.1f} | {100 * row['error']:+.1f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--placements", help="comma-separated subset of " + ", ".join(PLACEMENTS))
    args = parser.parse_args()
    size = SIZES[args.size]
    chosen = args.placements.split(",") if args.placements else size["placements"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with EmulatedWan(args.rtt_ms, args.rate_mbit) as wan:
        onprem = measure(wan, [], "onprem", size["requests"], out / "onprem")
        runs = {name: measure(wan, PLACEMENTS[name][0], PLACEMENTS[name][1], size["requests"], out / name) for name in chosen}
        mode = wan.mode
    (out / "atlas-config.json").write_text(json.dumps(config_overrides(args.rtt_ms, args.rate_mbit, "onprem"), indent=1))
    results = compare(onprem, runs, args.rtt_ms, args.rate_mbit)
    meta = {"machine": f"{os.cpu_count()} CPU cores, {socket.gethostname()}", "wan_mode": mode, "rtt_ms": args.rtt_ms,
            "rate_mbit": args.rate_mbit, "requests": size["requests"], "realtime": bool(realtime_prefix())}
    (out / "results.json").write_text(json.dumps({"meta": meta, "placements": results}, indent=2))
    (out / "results.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
