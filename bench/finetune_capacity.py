"""Experiment 1 — fine-tuning capacity and throughput: N concurrent jobs, each its own adapter.

Symbiosis: one ``symbiosis serve`` process and N client processes; baseline: N transformers + PEFT
processes, each with its own copy of the base. Both sides run the same jobs (PEFT methods mixed:
LoRA, IA3, LoHa, prefix tuning, LoKr, prompt tuning, AdaLoRA, OFT in turn; AdamW; ``--batch`` x
``--seq-len`` tokens per step) for ``--duration`` seconds after a common start. Each side may use the
whole machine: the server computes with ``--server-threads`` torch threads (default: one per core),
its clients with ``--threads``, and each of the N baseline processes with max(``--threads``,
cores // N). Every job takes a small warm-up step before the common start; throughput is counted
in the interval in which every job was running (common start to the first job's last step end,
progress within a step interpolated). Memory is the sum of the processes' peak RSS (server included).

The memory budget (``--budget-gib``) decides how far the baseline runs (N whose predicted memory,
N x its one-job RSS, fits) and, from a linear fit of measured memory against N for each side
(fixed + per-job x N), the largest N that fits the budget.

Targets: >= 8x more adapters within the same budget; aggregate tokens/s >= the baseline's at every
N the baseline can run.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.procs import run_workers, start_server
from bench.workers import FINETUNE_METHODS, common_window, idle_job, tokens_in_window, train_job

GIB = 2**30
TARGET_ADAPTER_RATIO = 8.0


def run_side(system: str, n: int, path: Path, args) -> dict:
    """N jobs of ``system`` (``"symbiosis"`` or ``"peft"``); throughput, memory and where the run's time went."""
    begin = time.time()
    server = start_server(path, device=args.device, dtype=args.dtype, threads=args.server_threads) if system == "symbiosis" else None
    try:
        specs = [{"system": system, "target": server and server.address, "model_dir": str(path), "device": args.device, "dtype": args.dtype,
                  "method": FINETUNE_METHODS[i % len(FINETUNE_METHODS)], "threads": job_threads(system, n, args), "steps": args.min_steps,
                  "duration_s": args.duration, "batch": args.batch, "seq_len": args.seq_len} for i in range(n)]
        run = run_workers(train_job, specs, extra_pids=[server.pid] if server else [])
    finally:
        if server is not None:
            server.stop()
    t0, t1 = common_window(run.reports)
    per_job = [tokens_in_window(r, t0, t1) / (t1 - t0) for r in run.reports]
    return {
        "system": system, "n": n, "window_s": t1 - t0, "aggregate_tokens_per_s": sum(per_job),
        "per_job_tokens_per_s": per_job, "per_job_mean_tokens_per_s": sum(per_job) / n,
        "steps": [len(r["step_ends"]) for r in run.reports], "methods": [r["method"] for r in run.reports],
        "peak_rss_sum_gib": run.peak_rss_sum / GIB, "sampled_peak_rss_sum_gib": run.sampled_peak_rss_sum / GIB,
        "sampled_peak_pss_sum_gib": run.sampled_peak_pss_sum / GIB,
        "process_peak_rss_gib": [r["peak_rss_bytes"] / GIB for r in run.reports],
        "first_losses": [r["losses"][0] for r in run.reports], "last_losses": [r["losses"][-1] for r in run.reports],
        "startup_s": run.started - begin, "elapsed_s": time.time() - begin,
    }


def job_threads(system: str, n: int, args) -> int:
    """Torch threads of each job: Symbiosis clients ``--threads``; the N baseline jobs share the cores."""
    return args.threads if system == "symbiosis" else max(args.threads, (os.cpu_count() or 1) // n)


def capacity(rows: list[dict], budget_gib: float) -> dict:
    """Fit memory = fixed + per_job x N on the measured points; the largest N within ``budget_gib``."""
    ns = np.array([r["n"] for r in rows], dtype=float)
    mem = np.array([r["peak_rss_sum_gib"] for r in rows])
    if len(ns) >= 2:
        per_job, fixed = np.polyfit(ns, mem, 1)
    else:
        per_job, fixed = mem[0] / ns[0], 0.0
    fits = [int(r["n"]) for r in rows if r["peak_rss_sum_gib"] <= budget_gib]
    return {"fixed_gib": float(fixed), "per_job_gib": float(per_job), "largest_n_in_budget": max(0, math.floor((budget_gib - fixed) / per_job)),
            "largest_measured_n_in_budget": max(fits, default=0)}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("finetune_capacity", __doc__)
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="numbers of concurrent jobs")
    p.add_argument("--budget-gib", type=float, default=12.0, help="memory budget (default 12 GiB: half of this 24 GiB VM)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds every job trains after the common start")
    p.add_argument("--min-steps", type=int, default=1, help="measured steps every job runs at least (after its warm-up step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args(argv)
    if args.min_steps < 1:
        p.error("--min-steps must be >= 1")
    if args.server_threads is None:
        args.server_threads = os.cpu_count() or 1
    if args.smoke:
        args.n, args.duration, args.min_steps, args.batch, args.seq_len = [2], 0.0, 1, 2, 16
    path = common.model_dir(args)
    start = common.start(args)
    began = time.time()
    symbiosis, baseline = [], []
    for n in args.n:
        symbiosis.append(run_side("symbiosis", n, path, args))
        one_job = baseline[0]["peak_rss_sum_gib"] if baseline else 0.0
        if n * one_job <= args.budget_gib:  # interleaved with the Symbiosis runs, as far as the budget allows
            baseline.append(run_side("peft", n, path, args))
    cap = {"symbiosis": capacity(symbiosis, args.budget_gib), "peft": capacity(baseline, args.budget_gib),
           "runtime_gib": run_workers(idle_job, [{}]).peak_rss_sum / GIB}
    ratio = cap["symbiosis"]["largest_n_in_budget"] / max(cap["peft"]["largest_n_in_budget"], 1)
    by_n = {r["n"]: r for r in baseline}
    throughput_ok = all(r["aggregate_tokens_per_s"] >= by_n[r["n"]]["aggregate_tokens_per_s"] for r in symbiosis if r["n"] in by_n)
    result = {
        "model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": start,
        "config": {k: getattr(args, k) for k in ("n", "budget_gib", "duration", "min_steps", "batch", "seq_len", "threads",
                                                           "server_threads", "malloc_mmap_threshold")},
        "symbiosis": symbiosis, "peft": baseline, "capacity": cap,
        "targets": {"adapter_ratio_min": TARGET_ADAPTER_RATIO, "adapter_ratio": ratio, "adapter_ratio_met": ratio >= TARGET_ADAPTER_RATIO,
                    "throughput_at_least_baseline_met": throughput_ok},
        "elapsed_s": time.time() - began,
    }
    rows = []
    for r in symbiosis:
        b = by_n.get(r["n"])
        rows.append([r["n"], r["peak_rss_sum_gib"], b and b["peak_rss_sum_gib"], r["aggregate_tokens_per_s"], b and b["aggregate_tokens_per_s"],
                     r["per_job_mean_tokens_per_s"], b and b["per_job_mean_tokens_per_s"]])
    md = common.table(["N jobs", "Symbiosis peak RSS GiB", "PEFT peak RSS GiB", "Symbiosis tokens/s", "PEFT tokens/s",
                       "Symbiosis tokens/s per job", "PEFT tokens/s per job"], rows)
    md += (f"\nBudget {args.budget_gib:g} GiB: Symbiosis fits N = {cap['symbiosis']['largest_n_in_budget']} "
           f"({cap['symbiosis']['fixed_gib']:.2f} GiB + {cap['symbiosis']['per_job_gib']:.2f} GiB per job), PEFT N = "
           f"{cap['peft']['largest_n_in_budget']} ({cap['peft']['fixed_gib']:.2f} GiB + {cap['peft']['per_job_gib']:.2f} GiB per job): "
           f"{ratio:.2f}x more adapters (target >= {TARGET_ADAPTER_RATIO:g}x). Aggregate tokens/s >= PEFT at every N it ran: "
           f"{'yes' if throughput_ok else 'no'}. A process that only imports torch, transformers, PEFT and Symbiosis peaks at "
           f"{cap['runtime_gib']:.2f} GiB RSS.\n")

    def draw_memory(out: Path) -> Path:
        return common.chart(out / "finetune_capacity_memory.png", "peak memory (sum of processes' peak RSS)", "concurrent jobs N", "GiB",
                            {"Symbiosis": ([r["n"] for r in symbiosis], [r["peak_rss_sum_gib"] for r in symbiosis]),
                             "PEFT (a base per job)": ([r["n"] for r in baseline], [r["peak_rss_sum_gib"] for r in baseline]),
                             f"budget {args.budget_gib:g} GiB": (args.n, [args.budget_gib] * len(args.n))}, logx=True)

    def draw_throughput(out: Path) -> Path:
        return common.chart(out / "finetune_capacity_throughput.png", "aggregate fine-tuning throughput", "concurrent jobs N", "tokens/s",
                            {"Symbiosis": ([r["n"] for r in symbiosis], [r["aggregate_tokens_per_s"] for r in symbiosis]),
                             "PEFT (a base per job)": ([r["n"] for r in baseline], [r["aggregate_tokens_per_s"] for r in baseline])}, logx=True)

    common.write(args, "finetune_capacity", result, md, [draw_memory, draw_throughput])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
