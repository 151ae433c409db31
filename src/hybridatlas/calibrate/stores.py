"""Calibration: round trips per operation measured with real clients (redis-py, pymemcache, requests)
against real servers (Debian's redis-server and memcached, an HTTP/1.1 keep-alive server) across the
emulated WAN, as a function of payload size.

For each operation and payload the client times it across the WAN (from the on-prem namespace to a
server in the cloud one) and locally (client beside the server). Round trips are

    (median WAN time - median local time - payload bytes / link rate) / RTT,

once with the connection idle longer than TCP's retransmission timeout before each operation (slow
start restarts) and once in use (the operation right after another),

the quantity Atlas multiplies by the RTT (it adds bytes / bandwidth separately), so at the calibrated
RTT and rate the latency model reproduces the measured times. The result is written as a config file
whose `round_trips` rules (one per callee kind: points and warm_points = median over that kind's
operations, made non-decreasing) load with `--config`; the per-operation measurements travel along under `_calibration`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hybridatlas.emulation.netns import EmulatedWan
from hybridatlas.errors import AtlasInputError

PORTS = {"redis": 16379, "memcached": 11311, "http": 18080}
KIND_OF_OPERATION = {"redis": "redis", "memcached": "memcached", "http": "*"}


def _server_commands(address: str) -> dict[str, list[str]]:
    return {"redis": ["redis-server", "--port", str(PORTS["redis"]), "--bind", address, "--save", "", "--appendonly", "no",
                      "--protected-mode", "no", "--logfile", ""],
            "memcached": ["memcached", "-u", "root", "-l", address, "-p", str(PORTS["memcached"]), "-U", "0", "-m", "256"],
            "http": [sys.executable, "-m", "hybridatlas.calibrate.probe", "--serve-http", f"{address}:{PORTS['http']}"]}


def _probe(wan: EmulatedWan, side: str, address: str, sizes: list[int], reps: int, idle_s: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "hybridatlas.calibrate.probe", "--redis", f"{address}:{PORTS['redis']}",
            "--memcached", f"{address}:{PORTS['memcached']}", "--http", f"{address}:{PORTS['http']}",
            "--sizes", ",".join(map(str, sizes)), "--reps", str(reps), "--idle-s", str(idle_s)]
    done = subprocess.run(wan.command(side, argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise AtlasInputError("calibration probe", done.stderr.strip()[-2000:])
    return json.loads(done.stdout)


def _wait_listening(wan: EmulatedWan, address: str, timeout_s: float = 10.0) -> None:
    code = ("import socket,time,sys\nend=time.time()+%r\nfor port in %r:\n while True:\n  try:\n"
            "   socket.create_connection((%r,port),1).close();break\n  except OSError:\n"
            "   if time.time()>end: sys.exit('port %%d not listening' %% port)\n   time.sleep(0.05)") % (
        timeout_s, list(PORTS.values()), address)
    done = subprocess.run(wan.command("cloud", [sys.executable, "-c", code]), capture_output=True, text=True)
    if done.returncode != 0:
        raise AtlasInputError("calibration", f"servers did not start: {done.stderr.strip()}")


def measure(rtt_ms: float = 20.0, rate_mbit: float = 100.0, sizes: list[int] | None = None, reps: int = 3,
            idle_s: float = 1.5) -> dict[str, Any]:
    """Run the probes across and beside the WAN; returns the calibration document (see module doc)."""
    sizes = sizes or [100, 1_000, 10_000, 50_000, 200_000]
    with EmulatedWan(rtt_ms, rate_mbit) as wan:
        address = wan.address("cloud")
        servers = [subprocess.Popen(wan.command("cloud", argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for argv in _server_commands(address).values()]
        try:
            _wait_listening(wan, address)
            local = _probe(wan, "cloud", address, sizes, reps, 0.0)
            remote = {"idle": _probe(wan, "onprem", address, sizes, reps, idle_s),
                      "warm": _probe(wan, "onprem", address, sizes, reps, 0.0)}
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(10)
        mode, congestion = wan.mode, wan.congestion_control
    rate_bytes_per_ms = rate_mbit * 1e6 / 8 / 1e3
    operations: dict[str, Any] = {}
    for state, probe in remote.items():
        for name, by_size in probe["timings_ms"].items():
            for size, samples in by_size.items():
                request, response = probe["payload_bytes"][name][size]
                wan_ms, local_ms = float(np.median(samples)), float(np.median(local["timings_ms"][name][size]))
                row = operations.setdefault(name, {}).setdefault(size, {"local_ms": local_ms,
                                                                        "payload_bytes": max(request, response)})
                row[f"{state}_wan_ms"] = wan_ms
                row[f"{state}_round_trips"] = max(0.0, (wan_ms - local_ms - (request + response) / rate_bytes_per_ms) / rtt_ms)
    return {"round_trips": rules_from(operations),
            "_calibration": {"measured": time.strftime("%Y-%m-%d"), "wan": {"rtt_ms": rtt_ms, "rate_mbit": rate_mbit,
                                                                            "mode": mode, "congestion_control": congestion},
                             "reps": reps, "idle_s": idle_s, "operations": operations}}


def _curve(operations: dict[str, dict[str, dict[str, float]]], names: list[str], key: str) -> list[list[float]]:
    """(payload, median over `names` of `key`) per payload, made non-decreasing in payload."""
    sizes = sorted({int(size) for name in names for size in operations[name]})
    points, highest = [], 0.0
    for size in sizes:
        values = [operations[name][str(size)][key] for name in names if str(size) in operations[name]]
        highest = max(highest, float(np.median(values)))
        points.append([size, round(highest, 3)])
    return points


def rules_from(operations: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """One rule per callee kind: points (idle connection) and warm_points (connection in use), the
    median round trips over the kind's operations; the HTTP rule is the catch-all for RPCs."""
    rules = []
    for prefix, kind in KIND_OF_OPERATION.items():
        names = [name for name in operations if name.startswith(prefix + " ")]
        if names:
            rules.append({"operation": "*", "kind": kind, "points": _curve(operations, names, "idle_round_trips"),
                          "warm_points": _curve(operations, names, "warm_round_trips"),
                          "why": f"measured: median of {', '.join(names)} (hybridatlas calibrate stores)"})
    return rules
