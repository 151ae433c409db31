"""Symbiosis on Ray (issue 16): what the Ray deployment costs and what it buys, on a Ray cluster on this host.

1. Per-op round trip through a Ray-deployed shard against a directly started ``symbiosis serve``
   (same model, one op 64 -> 64 float32, 4 KiB and 1 MiB each way, shared memory and TCP), from one
   client thread: the transport alone (``RemoteTransport`` to the actor's address) and through
   ``symbiosis+ray://`` (the registry's assignment, then the same connection). The paths alternate
   round by round; the table gives the median over rounds of each round's p50 / p99. They should
   be equal: per-op tensors do not pass through Ray.
2. SIGKILL to first answer: a client calls an op in a loop; the shard actor's process is killed
   between two of its calls; the time from the kill to the answer of the next call (and to the
   moment the new process reported that it serves), over ``--kills`` kills.
3. Fine-tuning throughput of ``--clients`` client processes (LoRA, AdamW; the capacity
   experiment's ``train_job``) against 1 and then 2 replicas of the executor, tokens/s summed over
   the clients while all ran. Clients connect through ``symbiosis+ray://`` (the registry spreads
   them over the replicas).

    python -m bench.ray_cluster [--model-dir DIR] [--clients 8] [--duration 20] [--out bench/results/ray_cluster]
"""

from __future__ import annotations

import os
import signal
import tempfile
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from bench import common
from bench.procs import run_workers, start_server
from bench.workers import common_window, tokens_in_window, train_job

OP = "model.layers.0.self_attn.o_proj"
PAYLOADS = {"4 KiB": 16, "1 MiB": 4096}
NAME = "bench"


def rpc_model(scratch: Path) -> Path:
    """The round-trip model: a tiny Llama whose first op maps 64 -> 64 (as ``bench.transport``)."""
    from symbiosis.tiny import save_random_model, tiny_config

    return save_random_model(tiny_config("llama"), scratch / "rpc-model")


def round_trips(calls: dict[str, Any], rows: int, iterations: int, rounds: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Per path: the median over ``rounds`` of each round's p50 and p99 (µs), paths alternating."""
    from symbiosis.protocol import Direction, OpRequest

    request = OpRequest(OP, Direction.FORWARD, torch.randn(rows, 64, dtype=dtype))
    per_round: dict[str, list[dict[str, float]]] = {path: [] for path in calls}
    for path, run in calls.items():
        for _ in range(max(20, iterations // 10)):
            run(request)
    for _ in range(rounds):
        for path, run in calls.items():
            samples = []
            for _ in range(iterations):
                start = time.perf_counter()
                run(request)
                samples.append(time.perf_counter() - start)
            per_round[path].append(common.percentiles(samples, 1e6))
    return {path: {q: statistics.median(r[q] for r in results) for q in ("p50", "p99")} for path, results in per_round.items()}


def placement(args) -> dict[str, Any]:
    """Device options of every deployment: on a GPU, each shard takes half of one (two fit on one GPU)."""
    gpu = args.device.startswith("cuda")
    return dict(device=args.device, dtype=args.dtype, num_gpus_per_shard=0.5 if gpu else 0.0)


def measure_round_trips(args, scratch: Path) -> list[dict[str, Any]]:
    import symbiosis.ray as sray
    from symbiosis.transport import RemoteTransport, connect

    model = rpc_model(scratch)
    direct = start_server(model, device=args.device, dtype=args.dtype, threads=1)
    sray.deploy(model, "rpc", serve_options=["--threads", "1"], **placement(args))
    try:
        [replica] = sray.status("rpc")[0]["shards"][0]["replicas"]
        actor = replica["address"].removeprefix("symbiosis://")
        rows = []
        for shm in (True, False):
            lane = "shm" if shm else "tcp"
            calls = {
                f"direct {lane}": RemoteTransport(direct.address.removeprefix("symbiosis://"), shared_memory=shm).run,
                f"ray-deployed {lane}": RemoteTransport(actor, shared_memory=shm).run,
                f"symbiosis+ray:// {lane}": connect("symbiosis+ray://rpc", shared_memory=shm).run,
            }
            for payload, n in PAYLOADS.items():
                iterations = args.iterations if n <= 16 else max(20, args.iterations // 8)
                for path, stats in round_trips(calls, n, iterations, args.rounds, getattr(torch, args.dtype)).items():
                    rows.append({"path": path, "lane": lane, "payload": payload, **stats})
        return rows
    finally:
        direct.stop()
        sray.shutdown("rpc", grace_s=0)


def measure_restarts(args, scratch: Path) -> list[dict[str, Any]]:
    """Kill the shard actor ``--kills`` times, between two calls of a client that calls an op in a loop."""
    import symbiosis.ray as sray
    from symbiosis.protocol import Direction, OpRequest
    from symbiosis.transport import connect

    model = rpc_model(scratch)
    sray.deploy(model, "restart", serve_options=["--threads", "1"], **placement(args))
    client = connect("symbiosis+ray://restart", retry_timeout_s=600)
    request = OpRequest(OP, Direction.FORWARD, torch.randn(16, 64, dtype=getattr(torch, args.dtype)))
    calls: list[tuple[float, float]] = []  # (start, end) of every answered call
    between_calls, stop = threading.Lock(), threading.Event()

    def call_forever() -> None:
        while not stop.is_set():
            with between_calls:  # the kill happens between two calls
                pass
            start = time.monotonic()
            client.run(request)
            calls.append((start, time.monotonic()))

    caller = threading.Thread(target=call_forever, daemon=True)
    caller.start()
    results = []
    try:
        for _ in range(args.kills):
            time.sleep(1.0)
            [before] = sray.status("restart")[0]["shards"][0]["replicas"]
            with between_calls:
                process = psutil.Process(before["pid"])
                killed, killed_wall = time.monotonic(), time.time()
                process.send_signal(signal.SIGKILL)
                process.wait(30)
            while not [end for start, end in calls[-50:] if start >= killed]:
                time.sleep(0.005)
            first = min(end for start, end in calls[-50:] if start >= killed)
            while (after := sray.status("restart")[0]["shards"][0]["replicas"][0])["pid"] == before["pid"] or after["state"] != "ready":
                time.sleep(0.05)
            results.append(
                {
                    "kill_to_first_answer_s": first - killed,
                    "kill_to_serving_s": after["since"] - killed_wall,  # the new process reported "ready"
                    "old_pid": before["pid"],
                    "new_pid": after["pid"],
                    "starts": after["starts"],
                }
            )
    finally:
        stop.set()
        caller.join(60)
        client.close()
        sray.shutdown("restart", grace_s=0)
    return results


def measure_throughput(args, model: Path) -> list[dict[str, Any]]:
    import symbiosis.ray as sray

    rows = []
    sray.deploy(model, NAME, replicas=1, num_cpus_per_shard=1, serve_options=["--threads", str(args.server_threads)], **placement(args))
    try:
        for replicas in (1, 2):
            if replicas > 1:
                sray.scale(NAME, replicas)
            specs = [
                dict(system="symbiosis", target=f"symbiosis+ray://{NAME}", method="lora", batch=args.batch, seq_len=args.seq_len,
                     steps=1, duration_s=args.duration, threads=args.threads)
                for _ in range(args.clients)
            ]
            pids = [r["pid"] for shard in sray.status(NAME)[0]["shards"] for r in shard["replicas"]]
            spread: dict[int, int] = {}
            done = threading.Event()

            def watch_spread() -> None:  # the most clients each replica had at once
                while not done.wait(0.5):
                    for r in sray.status(NAME)[0]["shards"][0]["replicas"]:
                        spread[r["replica"]] = max(spread.get(r["replica"], 0), r["clients"])

            watcher = threading.Thread(target=watch_spread, daemon=True)
            watcher.start()
            try:
                run = run_workers(train_job, specs, extra_pids=pids)
            finally:
                done.set()
                watcher.join()
            t0, t1 = common_window(run.reports)
            tokens = sum(tokens_in_window(r, t0, t1) for r in run.reports)
            rows.append({"replicas": replicas, "clients": args.clients, "tokens_per_s": tokens / (t1 - t0), "window_s": t1 - t0,
                         "clients_per_replica": spread})
    finally:
        sray.shutdown(NAME, grace_s=0)
    return rows


def main() -> int:
    p = common.parser("ray_cluster", __doc__)
    p.add_argument("--iterations", type=int, default=1000, help="calls per path, payload and round (1 MiB: an eighth)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every round-trip path")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of the shard actor")
    p.add_argument("--clients", type=int, default=8, help="fine-tuning client processes")
    p.add_argument("--duration", type=float, default=20.0, help="seconds every client fine-tunes, per replica count")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args()
    if args.smoke:
        args.iterations, args.rounds, args.kills, args.clients, args.duration, args.batch, args.seq_len = 40, 1, 1, 2, 1.0, 1, 8
    load = common.start(args)
    from symbiosis.ray.local import local_cluster

    model = common.model_dir(args)
    scratch = Path(tempfile.mkdtemp(prefix="symbiosis-bench-ray-"))
    cpus = max(2, os.cpu_count() or 2)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    with local_cluster([dict(num_cpus=cpus, num_gpus=gpus, resources={"head": 1}), dict(num_cpus=cpus, num_gpus=0, resources={"second": 1})]):
        rtt = measure_round_trips(args, scratch)
        restarts = measure_restarts(args, scratch)
        throughput = measure_throughput(args, model)
    kills = [r["kill_to_first_answer_s"] for r in restarts]
    markdown = "**Per-op round trip** (µs, median over rounds of p50 / p99)\n\n" + common.table(
        ["path", "payload", "p50 µs", "p99 µs"], [[r["path"], r["payload"], r["p50"], r["p99"]] for r in rtt]
    )
    markdown += "\n**SIGKILL of the shard actor** (s)\n\n" + common.table(
        ["kill", "kill to serving again", "kill to first answer"],
        [[i + 1, r["kill_to_serving_s"], r["kill_to_first_answer_s"]] for i, r in enumerate(restarts)],
    )
    markdown += "\n**Fine-tuning throughput**\n\n" + common.table(
        ["replicas", "clients", "tokens/s", "clients per replica"],
        [[r["replicas"], r["clients"], r["tokens_per_s"], r["clients_per_replica"]] for r in throughput],
    )
    speedup = throughput[1]["tokens_per_s"] / throughput[0]["tokens_per_s"]
    markdown += f"\n2 replicas / 1 replica: {speedup:.2f}x\n"
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model_parameters": common.parameter_count(model),
        "load_at_start": load,
        "round_trips": rtt,
        "restarts": restarts,
        "kill_to_first_answer_s_median": statistics.median(kills),
        "throughput": throughput,
        "throughput_2_vs_1_replicas": speedup,
        "targets": {"round_trip": "Ray-deployed shard equal to a directly started server (data does not pass through Ray)"},
    }

    def draw(out: Path) -> Path:
        shm = [r for r in rtt if r["payload"] == "4 KiB"]
        return common.chart(out / "ray_cluster.png", "per-op round trip, 4 KiB each way (p50)", "path", "µs",
                            {"p50": ([r["path"] for r in shm], [r["p50"] for r in shm])}, kind="bar")

    common.write(args, "ray_cluster", result, markdown, [draw])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
