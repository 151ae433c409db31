"""Experiment 1 — fine-tuning capacity and throughput: N concurrent jobs, each its own adapter.

Symbiosis: one ``symbiosis serve`` process and N client processes; baseline: N transformers + PEFT
processes, each with its own copy of the base. Both sides run the same jobs (PEFT methods mixed:
LoRA, IA3, LoHa, prefix tuning, LoKr, prompt tuning, AdaLoRA, OFT in turn; AdamW; ``--batch`` x
``--seq-len`` tokens per step) for ``--duration`` seconds after a common start. Each side may use the
whole machine: the server computes with ``--server-threads`` torch threads (default: one per core),
its clients with ``--threads``, and each of the N baseline processes with max(``--threads``,
cores // N). Every job takes a small warm-up step before the common start; throughput is counted
in the interval in which every job was running (common start to the first job's last step end,
progress within a step interpolated). Memory is the sum of the processes' peak RSS (server included),
and the peak of their simultaneous PSS sum (shared pages split between the processes mapping them).

``--base-dtype`` and ``--quantize`` load the base the way a user would, on both sides: bfloat16, or
quantized by bitsandbytes (the Symbiosis server with ``--quantize``; each baseline process as a QLoRA
user does, ``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training``, with the methods PEFT can put on
quantized layers). A checkpoint stored in the dtype it is loaded in stays memory-mapped on a CPU, so N
baseline processes share its pages (PSS shows it); a converted or quantized base is private to each.

The memory budget (``--budget-gib``) decides how far the baseline runs (N whose predicted memory,
N x its one-job RSS, fits) and, from a linear fit of measured memory against N for each side
(fixed + per-job x N, by peak RSS and by PSS), the largest N that fits the budget. From the fitted
costs and the base's bytes, the base size at which sharing starts to pay (ratio 1) and reaches the
target ratio in this budget.

Targets: >= 8x more adapters within the same budget; aggregate tokens/s >= the baseline's at every
N the baseline can run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.procs import run_workers, start_server
from bench.workers import FINETUNE_METHODS, QLORA_METHODS, common_window, idle_job, tokens_in_window, train_job

GIB = 2**30
TARGET_ADAPTER_RATIO = 8.0


def run_side(system: str, n: int, path: Path, args) -> dict:
    """N jobs of ``system`` (``"symbiosis"`` or ``"peft"``); throughput, memory and where the run's time went."""
    begin = time.time()
    quantize = None if args.quantize == "none" else args.quantize
    server = start_server(path, device=args.device, dtype=args.base_dtype, threads=args.server_threads, timeout_s=1800.0,
                          options=["--quantize", quantize] if quantize else []) if system == "symbiosis" else None
    methods = args.methods or (QLORA_METHODS if quantize else FINETUNE_METHODS)
    try:
        specs = [{"system": system, "target": server and server.address, "model_dir": str(path), "device": args.device,
                  "dtype": args.base_dtype, "quantize": quantize, "embeddings": args.embeddings,
                  "method": methods[i % len(methods)], "threads": job_threads(system, n, args), "steps": args.min_steps,
                  "duration_s": args.duration, "batch": args.batch, "seq_len": args.seq_len} for i in range(n)]
        run = run_workers(train_job, specs, extra_pids=[server.pid] if server else [], reset_peaks_at_start=args.peaks_after_load)
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
        "load_peak_rss_sum_gib": None if run.load_peak_rss_sum is None else run.load_peak_rss_sum / GIB, "sampled_peak_device_sum_gib": run.sampled_peak_device_sum / GIB,
        "process_peak_rss_gib": [r["peak_rss_bytes"] / GIB for r in run.reports],
        "first_losses": [r["losses"][0] for r in run.reports], "last_losses": [r["losses"][-1] for r in run.reports],
        "base_bytes_per_job": [r["base_bytes"] for r in run.reports], "server_parameter_bytes": server.parameter_bytes if server else 0,
        "startup_s": run.started - begin, "elapsed_s": time.time() - begin,
    }


def job_threads(system: str, n: int, args) -> int:
    """Torch threads of each job: Symbiosis clients ``--threads``; the N baseline jobs share the cores."""
    return args.threads if system == "symbiosis" else max(args.threads, (os.cpu_count() or 1) // n)


def capacity(rows: list[dict], budget_gib: float, key: str = "peak_rss_sum_gib") -> dict:
    """Fit memory (``key``) = fixed + per_job x N on the measured points; the largest N within ``budget_gib``."""
    ns = np.array([r["n"] for r in rows], dtype=float)
    mem = np.array([r[key] for r in rows])
    if len(ns) >= 2:
        per_job, fixed = np.polyfit(ns, mem, 1)
    else:
        per_job, fixed = mem[0] / ns[0], 0.0
    fits = [int(r["n"]) for r in rows if r[key] <= budget_gib]
    largest = max(0, math.floor((budget_gib - fixed) / per_job)) if per_job > 0 else None  # None: no memory grows with N
    return {"fixed_gib": float(fixed), "per_job_gib": float(per_job), "largest_n_in_budget": largest,
            "largest_measured_n_in_budget": max(fits, default=0)}


def adapter_ratio(symbiosis: dict, peft: dict) -> float:
    """Largest N of Symbiosis over the baseline's (at least 1); NaN where a fit has no per-job memory."""
    if symbiosis["largest_n_in_budget"] is None or peft["largest_n_in_budget"] is None:
        return math.nan
    return symbiosis["largest_n_in_budget"] / max(peft["largest_n_in_budget"], 1)


def crossover(sym: dict, peft: dict, base_gib: float, peft_base_gib: float, budget_gib: float, target: float) -> dict:
    """How the adapter ratio grows with the base's size, from the fitted costs with the base taken out.

    Symbiosis: (fixed - base) + base once, per-job as fitted (clients hold no base); PEFT: (per-job -
    its base copy) + base per job. ratio(B) = whole Symbiosis jobs / whole PEFT jobs (at least 1) in
    a budget, as ``adapter_ratio`` counts. Returns, for this budget, the smallest base (GiB, held as
    here) with more adapters than the baseline and with ``target`` times as many, and the best ratio;
    and the smallest budget (up to 16x this one) in which some base reaches ``target``, with that base.
    """
    server_own, client = sym["fixed_gib"] - base_gib, sym["per_job_gib"]
    job_own = peft["per_job_gib"] - peft_base_gib

    def ratios(budget: float) -> tuple[np.ndarray, np.ndarray]:
        sizes = np.linspace(0.0, budget, 2401)[1:]
        n_symbiosis = np.floor(np.maximum(budget - server_own - sizes, 0.0) / client)
        return sizes, n_symbiosis / np.maximum(np.floor(budget / (job_own + sizes)), 1)

    sizes, here = ratios(budget_gib)

    def first(above: float, strictly: bool = False) -> float | None:
        hits = np.nonzero(here > above if strictly else here >= above)[0]
        return float(sizes[hits[0]]) if len(hits) else None

    reach = {"target_budget_gib": None, "target_budget_base_gib": None}
    for budget in np.arange(budget_gib, 16 * budget_gib, budget_gib / 16):
        grid, r = ratios(float(budget))
        if r.max() >= target:
            reach = {"target_budget_gib": float(budget), "target_budget_base_gib": float(grid[int(np.argmax(r >= target))])}
            break
    return {"server_own_gib": server_own, "client_gib": client, "peft_job_own_gib": job_own, "base_gib": base_gib,
            "crossover_base_gib": first(1.0, strictly=True), "target_base_gib": first(target), "best_ratio": float(here.max()),
            "best_ratio_base_gib": float(sizes[int(here.argmax())]), **reach}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("finetune_capacity", __doc__)
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="numbers of concurrent jobs")
    p.add_argument("--budget-gib", type=float, default=12.0, help="memory budget (default 12 GiB: half of this 24 GiB VM)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds every job trains after the common start")
    p.add_argument("--min-steps", type=int, default=1, help="measured steps every job runs at least (after its warm-up step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--base-dtype", choices=["float32", "bfloat16"], help="dtype both sides load the base in (default --dtype)")
    p.add_argument("--quantize", choices=["none", "int8", "4bit"], default="none",
                   help="hold the base quantized on both sides (Symbiosis: serve --quantize; PEFT: QLoRA processes)")
    p.add_argument("--embeddings", choices=["client", "executor"], default="client",
                   help="where Symbiosis clients look up token embeddings (executor: the client holds nothing of the base's size)")
    p.add_argument("--methods", nargs="+", choices=FINETUNE_METHODS,
                   help="PEFT methods of the jobs, in turn (default: all eight; with --quantize those PEFT puts on quantized layers)")
    p.add_argument("--peaks-after-load", action="store_true",
                   help="memory peaks from the common start, when every process has loaded (the load's peaks are reported apart)")
    p.add_argument("--target-ratio", type=float, default=TARGET_ADAPTER_RATIO, help="adapter ratio the crossover analysis aims at")
    p.add_argument("--reanalyse", type=Path, metavar="JSON",
                   help="measure nothing: fit and report again the runs stored in a finetune_capacity.json (written to --out)")
    args = p.parse_args(argv)
    if args.reanalyse is not None:
        stored = json.loads(args.reanalyse.read_text())
        for name, value in stored["config"].items():
            setattr(args, name, value)
        args.device = stored.get("device", args.device)
        report(args, Path(stored["model_dir"]), stored["load_at_start"], stored["symbiosis"], stored["peft"],
               stored["capacity"]["runtime_gib"], stored["elapsed_s"])
        return 0
    args.base_dtype = args.base_dtype or args.dtype
    if args.min_steps < 1:
        p.error("--min-steps must be >= 1")
    if args.server_threads is None:
        args.server_threads = os.cpu_count() or 1
    if args.smoke:
        args.n, args.duration, args.min_steps, args.batch, args.seq_len = [2], 0.0, 1, 2, 16
    path = common.model_dir(args)
    start = common.start(args)
    began = time.time()
    # on a GPU the budget is device memory: the fits use the processes' GPU memory (nvidia-smi)
    key = "sampled_peak_device_sum_gib" if args.device.startswith("cuda") else "peak_rss_sum_gib"
    symbiosis, baseline = [], []
    for n in args.n:
        symbiosis.append(run_side("symbiosis", n, path, args))
        one_job = baseline[0][key] if baseline else 0.0
        if n * one_job <= args.budget_gib:  # interleaved with the Symbiosis runs, as far as the budget allows
            baseline.append(run_side("peft", n, path, args))
    report(args, path, start, symbiosis, baseline, run_workers(idle_job, [{}]).peak_rss_sum / GIB, time.time() - began)
    return 0


def report(args, path: Path, start: dict, symbiosis: list[dict], baseline: list[dict], runtime_gib: float, elapsed_s: float) -> None:
    """Fit both sides' memory, find the largest N in the budget and the crossover base size; write JSON, table, charts."""
    key = "sampled_peak_device_sum_gib" if args.device.startswith("cuda") else "peak_rss_sum_gib"
    cap = {"symbiosis": capacity(symbiosis, args.budget_gib, key), "peft": capacity(baseline, args.budget_gib, key),
           "symbiosis_pss": capacity(symbiosis, args.budget_gib, "sampled_peak_pss_sum_gib"),
           "peft_pss": capacity(baseline, args.budget_gib, "sampled_peak_pss_sum_gib"),
           "runtime_gib": runtime_gib}
    ratio = adapter_ratio(cap["symbiosis"], cap["peft"])
    ratio_pss = adapter_ratio(cap["symbiosis_pss"], cap["peft_pss"])
    base_gib = symbiosis[0]["server_parameter_bytes"] / GIB
    peft_base_gib = baseline[0]["base_bytes_per_job"][0] / GIB
    cross = crossover(cap["symbiosis"], cap["peft"], base_gib, peft_base_gib, args.budget_gib, args.target_ratio)
    # bytes per parameter of a dense base as the executor holds it (a quantized base's float32 embeddings do not scale so)
    per_parameter = base_gib * GIB / common.parameter_count(path) if args.quantize == "none" else None
    cross.update({f"{k.removesuffix('_gib')}_parameters": None if cross[k] is None or per_parameter is None else cross[k] * GIB / per_parameter
                  for k in ("crossover_base_gib", "target_base_gib", "best_ratio_base_gib", "target_budget_base_gib")},
                 base_bytes_per_parameter=per_parameter)
    by_n = {r["n"]: r for r in baseline}
    throughput_ok = all(r["aggregate_tokens_per_s"] >= by_n[r["n"]]["aggregate_tokens_per_s"] for r in symbiosis if r["n"] in by_n)
    result = {
        "model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": start, "device": args.device,
        "checkpoint_dtype": common.checkpoint_dtype(path),
        "config": {k: getattr(args, k) for k in ("n", "budget_gib", "duration", "min_steps", "batch", "seq_len", "threads",
                                                           "server_threads", "malloc_mmap_threshold", "base_dtype", "quantize",
                                                           "embeddings", "target_ratio", "methods", "peaks_after_load")},
        "symbiosis": symbiosis, "peft": baseline, "capacity": cap, "crossover": cross,
        "targets": {"adapter_ratio_min": args.target_ratio, "adapter_ratio": ratio, "adapter_ratio_met": ratio >= args.target_ratio,
                    "adapter_ratio_pss": ratio_pss,
                    "throughput_at_least_baseline_met": throughput_ok},
        "elapsed_s": elapsed_s,
    }
    rows = []
    for r in symbiosis:
        b = by_n.get(r["n"])
        rows.append([r["n"], r["peak_rss_sum_gib"], b and b["peak_rss_sum_gib"], r["sampled_peak_pss_sum_gib"], b and b["sampled_peak_pss_sum_gib"],
                     r["aggregate_tokens_per_s"], b and b["aggregate_tokens_per_s"], r["per_job_mean_tokens_per_s"], b and b["per_job_mean_tokens_per_s"]])
    md = common.table(["N jobs", "Symbiosis peak RSS GiB", "PEFT peak RSS GiB", "Symbiosis PSS GiB", "PEFT PSS GiB", "Symbiosis tokens/s",
                        "PEFT tokens/s", "Symbiosis tokens/s per job", "PEFT tokens/s per job"], rows)
    fit = lambda c: f"{c['fixed_gib']:.2f} GiB + {c['per_job_gib']:.2f} GiB per job"  # noqa: E731
    md += (f"\nBudget {args.budget_gib:g} GiB, by {'GPU memory' if key.endswith('device_sum_gib') else 'peak RSS'}: Symbiosis fits N = {cap['symbiosis']['largest_n_in_budget']} "
           f"({fit(cap['symbiosis'])}), PEFT N = {cap['peft']['largest_n_in_budget']} ({fit(cap['peft'])}): "
           f"{ratio:.2f}x more adapters (target >= {args.target_ratio:g}x). By PSS: Symbiosis N = "
           f"{cap['symbiosis_pss']['largest_n_in_budget']} ({fit(cap['symbiosis_pss'])}), PEFT N = {cap['peft_pss']['largest_n_in_budget']} "
           f"({fit(cap['peft_pss'])}): {ratio_pss:.2f}x. Aggregate tokens/s >= PEFT at every N it ran: "
           f"{'yes' if throughput_ok else 'no'}. A process that only imports torch, transformers, PEFT and Symbiosis peaks at "
           f"{cap['runtime_gib']:.2f} GiB RSS.\n\nWith the base taken out of the fitted costs (server's own {cross['server_own_gib']:.2f} GiB, "
           f"a client {cross['client_gib']:.2f} GiB, a PEFT job's own {cross['peft_job_own_gib']:.2f} GiB), sharing the base gives more adapters than the baseline from a base of "
           f"{_gib(cross['crossover_base_gib'], cross['crossover_base_parameters'])} as loaded here and reaches {args.target_ratio:g}x from "
           f"{_gib(cross['target_base_gib'], cross['target_base_parameters'])} "
           f"in {args.budget_gib:g} GiB (best {cross['best_ratio']:.1f}x at {cross['best_ratio_base_gib']:.2f} GiB); {args.target_ratio:g}x needs "
           + (f"a budget of {cross['target_budget_gib']:g} GiB and a base of "
              f"{_gib(cross['target_budget_base_gib'], cross['target_budget_base_parameters'])}.\n" if cross["target_budget_gib"] else "more than 16x this budget.\n"))

    md += (f"\nBase: {common.parameter_count(path) / 1e6:.0f}M parameters, checkpoint {result['checkpoint_dtype']}, loaded as "
          f"{args.base_dtype}{'' if args.quantize == 'none' else ', quantized ' + args.quantize} on both sides; held by the executor: "
          f"{base_gib:.2f} GiB, by each PEFT process: {peft_base_gib:.2f} GiB.\n")

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


def _gib(value: float | None, parameters: float | None = None) -> str:
    if value is None:
        return "never (in this budget)"
    if parameters is None:
        return f"{value:.2f} GiB"
    count = f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.0f}M"
    return f"{value:.2f} GiB (~{count} parameters held this way)"


if __name__ == "__main__":
    raise SystemExit(main())
