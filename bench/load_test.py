"""Load test: N client processes fine-tune and generate with mixed PEFT methods against one server.

Each client process attaches to the server (``symbiosis serve``, started here on a tiny model unless
``--address`` is given) with its own PEFT method; even-numbered clients fine-tune (one AdamW step
per iteration), odd-numbered ones generate (greedy, 8 new tokens per request), until ``--duration``
seconds have passed. Every client counts and times its op requests (client side); the server counts
what it answered per client id. The run fails (exit code 1) on any client error or any difference
between the two counts (a lost or duplicated request). Writes ``load_test.json`` and
``load_test.md`` under ``--out``.

    python bench/load_test.py [--clients 8] [--duration 30] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

METHODS = ["lora", "ia3", "loha", "prefix_tuning", "lokr", "prompt_tuning", "adalora", "oft"]


def peft_config(method: str, steps: int):
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PrefixTuningConfig, PromptTuningConfig

    return {
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"),
        "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": lambda: LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "lokr": lambda: LoKrConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"]),
        "oft": lambda: OFTConfig(task_type="CAUSAL_LM", r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]),
        "adalora": lambda: AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=3, total_step=max(steps, 10), target_modules=["q_proj", "v_proj"]),
        "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    }[method]()


def client(index: int, address: str, method: str, role: str, ready, duration: float, results) -> None:
    """One client process: fine-tune or generate until the deadline, then report counts and latencies."""
    warnings.filterwarnings("ignore")
    import torch
    from peft import get_peft_model

    from symbiosis import load_model
    from symbiosis.transport import MeteredTransport, connect
    from symbiosis.workload import AffineTask

    report = {"client": f"load-{index}", "method": method, "role": role, "iterations": 0, "errors": []}
    transport = None
    try:
        torch.manual_seed(index)
        transport = MeteredTransport(connect(address))
        model = get_peft_model(load_model(transport, client_id=report["client"]), peft_config(method, 1000))
        vocab = transport.spec().config["vocab_size"]
        task = AffineTask(vocab, a=1, b=index + 1)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        ready.wait(timeout=600)  # every client loaded: the load starts for all at once
        deadline = time.time() + duration
        while time.time() < deadline:
            step = report["iterations"]
            if role == "fine-tune":
                model.train()
                batch = task.sequences(4, 16, seed=step)
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                report["last_loss"] = loss.item()
            else:
                model.eval()
                prompt = task.sequences(1, 4, seed=step)
                with torch.no_grad():
                    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
            report["iterations"] += 1
    except Exception:
        report["errors"].append(traceback.format_exc(limit=3))
    if transport is not None:
        report["completed"] = transport.completed
        report["failed"] = transport.failed
        report["latencies"] = transport.latencies()
    results.put(report)


def start_server(scratch: Path) -> tuple[subprocess.Popen, str, int | None]:
    from symbiosis.tiny import save_random_model, tiny_config

    model_dir = save_random_model(
        tiny_config("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=512), scratch / "base"
    )
    ready = scratch / "ready.json"
    command = [sys.executable, "-m", "symbiosis.cli.main", "serve", str(model_dir), "--port", "0", "--metrics-port", "0", "--ready-file", str(ready)]
    server = subprocess.Popen(command)
    while not ready.exists():
        if server.poll() is not None:
            raise RuntimeError("the server did not start")
        time.sleep(0.1)
    info = json.loads(ready.read_text())
    return server, info["address"], info["metrics_port"]


def summarise(reports: list[dict], server_stats: dict, duration: float) -> dict:
    from symbiosis.transport.metered import percentiles_us

    by_op: dict[str, list[float]] = defaultdict(list)
    for report in reports:
        for key, values in report.get("latencies", {}).items():
            by_op[key].extend(values)
    served = server_stats["completed_by_client"]
    mismatches = {
        r["client"]: {"client": r.get("completed"), "server": served.get(r["client"], 0)}
        for r in reports
        if r.get("completed") != served.get(r["client"], 0)
    }
    total = server_stats["total"]
    return {
        "clients": len(reports),
        "duration_s": duration,
        "requests_client_side": sum(r.get("completed", 0) for r in reports),
        "requests_server_side": sum(served.get(r["client"], 0) for r in reports),
        "failed_requests": sum(r.get("failed", 0) for r in reports),
        "errors": [e for r in reports for e in r["errors"]],
        "count_mismatches": mismatches,
        "requests_per_gemm": total["requests_per_gemm"],
        "rows_per_gemm": total["rows_per_gemm"],
        "shared_gemm_fraction": total["shared_gemm_fraction"],
        "per_client": [{k: r.get(k) for k in ("client", "method", "role", "iterations", "completed", "failed", "last_loss")} for r in reports],
        "latency_us": {op: percentiles_us(values) for op, values in sorted(by_op.items())},
        "latency_us_all_ops": percentiles_us([v for values in by_op.values() for v in values]),
    }


def markdown(summary: dict) -> str:
    lines = [
        f"{summary['clients']} client processes, {summary['duration_s']:.0f} s: "
        f"{summary['requests_client_side']} requests sent and answered (server counted {summary['requests_server_side']}), "
        f"{summary['failed_requests']} failed, {len(summary['errors'])} client errors, "
        f"{len(summary['count_mismatches'])} count mismatches; {summary['requests_per_gemm']:.2f} requests and "
        f"{summary['rows_per_gemm']:.1f} rows per GEMM, {summary['shared_gemm_fraction']:.0%} of GEMMs shared by several clients.",
        "",
        "| client | method | role | iterations | requests |",
        "|---|---|---|---|---|",
        *[f"| {c['client']} | {c['method']} | {c['role']} | {c['iterations']} | {c['completed']} |" for c in summary["per_client"]],
        "",
        "| op (client-side round trip) | n | p50 µs | p90 µs | p99 µs |",
        "|---|---|---|---|---|",
        *[f"| {op} | {s['n']} | {s['p50']:.0f} | {s['p90']:.0f} | {s['p99']:.0f} |" for op, s in summary["latency_us"].items()],
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load after every client is ready")
    parser.add_argument("--address", help="symbiosis://host:port of a running server (default: start one on a tiny model)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    with tempfile.TemporaryDirectory() as scratch:
        if args.address:
            address = args.address
        else:
            server, address, _ = start_server(Path(scratch))
        try:
            ctx = multiprocessing.get_context("spawn")
            results, ready = ctx.Queue(), ctx.Barrier(args.clients)
            procs = [
                ctx.Process(
                    target=client,
                    args=(i, address, METHODS[i % len(METHODS)], "fine-tune" if i % 2 == 0 else "generate", ready, args.duration, results),
                )
                for i in range(args.clients)
            ]
            for proc in procs:
                proc.start()
            reports = [results.get(timeout=args.duration + 900) for _ in procs]
            for proc in procs:
                proc.join(60)
            from symbiosis.transport import connect

            stats = connect(address).stats()
        finally:
            if server is not None:
                server.terminate()
                server.wait(60)
    summary = summarise(sorted(reports, key=lambda r: int(r["client"].split("-")[1])), stats, args.duration)
    (args.out / "load_test.json").write_text(json.dumps(summary, indent=2))
    (args.out / "load_test.md").write_text(markdown(summary))
    print(markdown(summary))
    for error in summary["errors"]:
        print(error, file=sys.stderr)
    ok = not summary["errors"] and not summary["count_mismatches"] and summary["failed_requests"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
