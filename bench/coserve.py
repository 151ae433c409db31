"""Experiment 4 — co-serving: inference at a fixed request rate while 4 fine-tuning clients run.

One ``symbiosis serve`` process; client processes: one inference client (its own LoRA adapter;
greedy requests of ``--new-tokens`` tokens after a ``--prompt-len`` prompt, issued at ``--rate``
requests/s, open loop) and 4 fine-tuning clients (LoRA, IA3, LoHa, prefix tuning; AdamW,
``--batch`` x ``--seq-len``). Phases of ``--duration`` s each, fresh client processes each time:

1. inference alone: time per output token (TPOT) when idle, and the share of the executor's time
   the inference load uses (executor compute time / wall time);
2. fine-tuning alone: the 4 jobs' aggregate tokens/s;
3. both, inference priority on: the executor serves inference first (EDF with aging, the
   default), and the fine-tuning processes run at OS ``nice`` ``--nice`` (on a CPU host the
   clients' own work shares the cores too);
4. both, priority off (control): inference requests sent at training priority, no nice.

This is the process-level measurement; ``bench/symbiosis_coserve.py`` measures the same sharing one
level up, through the OpenAI-compatible server in one process.

Targets: p99 TPOT <= 1.5x idle with priority on; fine-tuning keeps >= 76% of its solo throughput,
at an inference load using <= 25% of the executor's time.
"""

from __future__ import annotations

from pathlib import Path

from bench import common
from bench.procs import run_workers, start_server
from bench.workers import common_window, decode_job, tokens_in_window, train_job

TARGETS = {"tpot_p99_ratio_max": 1.5, "finetune_kept_min": 0.76, "inference_share_max": 0.25}
FINETUNE = ["lora", "ia3", "loha", "prefix_tuning"]


def role_job(spec: dict, ready) -> dict:
    """A worker whose body is ``decode_job`` or ``train_job`` by ``spec["role"]``."""
    return {"role": spec["role"], **(decode_job if spec["role"] == "inference" else train_job)(spec, ready)}


def phase(name: str, server, specs: list[dict]) -> dict:
    """One phase: its specs' processes against ``server``; TPOT, fine-tuning tokens/s, executor busy share."""
    before = server.stats()["total"]["compute_ms_total"]
    run = run_workers(role_job, specs)
    busy_s = (server.stats()["total"]["compute_ms_total"] - before) / 1e3
    inference = [r for r in run.reports if r["role"] == "inference"]
    train = [r for r in run.reports if r["role"] == "training"]
    out: dict = {"phase": name, "wall_s": run.wall_s, "executor_busy_share": busy_s / run.wall_s}
    if inference:
        requests = [q for r in inference for q in r["requests"]]
        out["requests"] = len(requests)
        out["tpot_ms"] = common.percentiles([s for q in requests for s in q["steps_s"][1:]], 1e3)
        out["ttft_ms"] = common.percentiles([q["steps_s"][0] for q in requests], 1e3)
    if train:
        t0, t1 = common_window(train)
        out["finetune_tokens_per_s"] = sum(tokens_in_window(r, t0, t1) for r in train) / (t1 - t0)
        out["finetune_steps"] = [len(r["step_ends"]) for r in train]
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser("coserve", __doc__)
    p.add_argument("--duration", type=float, default=40.0, help="seconds per phase")
    p.add_argument("--rate", type=float, default=0.25, help="inference requests per second (default 0.25: about 25%% of the executor on 2 CPU cores)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--finetune-jobs", type=int, default=4, help="fine-tuning clients (methods: LoRA, IA3, LoHa, prefix tuning in turn)")
    p.add_argument("--nice", type=int, default=10, help="OS niceness of the fine-tuning processes with priority on")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.new_tokens, args.batch, args.seq_len, args.finetune_jobs = 2.0, 4, 2, 16, 1
    path = common.model_dir(args)
    start = common.start(args)
    server = start_server(path, device=args.device, dtype=args.dtype, threads=args.server_threads)
    try:
        base = {"system": "symbiosis", "target": server.address, "device": args.device, "threads": args.threads, "duration_s": args.duration}
        inference = dict(base, role="inference", method="lora", requests=10**6, rate=args.rate, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens)
        methods = [FINETUNE[i % len(FINETUNE)] for i in range(args.finetune_jobs)]
        training = [dict(base, role="training", method=m, steps=1, batch=args.batch, seq_len=args.seq_len) for m in methods]
        phases = [
            phase("inference alone", server, [inference]),
            phase("fine-tuning alone", server, training),
            phase("both, priority on", server, [inference] + [dict(s, nice=args.nice) for s in training]),
            phase("both, priority off", server, [dict(inference, priority="training")] + training),
        ]
    finally:
        server.stop()
    idle, solo, on, off = phases
    tpot_ratio = on["tpot_ms"]["p99"] / idle["tpot_ms"]["p99"]
    kept = on["finetune_tokens_per_s"] / solo["finetune_tokens_per_s"]
    result = {
        "model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": start,
        "config": {k: getattr(args, k) for k in ("duration", "rate", "prompt_len", "new_tokens", "batch", "seq_len", "nice", "threads",
                                                  "finetune_jobs")},
        "finetune_methods": [s["method"] for s in training], "phases": phases,
        "targets": {**TARGETS, "tpot_p99_ratio": tpot_ratio, "finetune_kept": kept, "inference_share": idle["executor_busy_share"],
                    "tpot_met": tpot_ratio <= TARGETS["tpot_p99_ratio_max"], "finetune_met": kept >= TARGETS["finetune_kept_min"],
                    "load_within_share": idle["executor_busy_share"] <= TARGETS["inference_share_max"],
                    "tpot_p99_ratio_priority_off": off["tpot_ms"]["p99"] / idle["tpot_ms"]["p99"],
                    "finetune_kept_priority_off": off["finetune_tokens_per_s"] / solo["finetune_tokens_per_s"]},
    }
    md = common.table(["phase", "TPOT p50 ms", "TPOT p99 ms", "requests", "fine-tuning tokens/s", "executor busy"],
                      [[ph["phase"], ph.get("tpot_ms", {}).get("p50"), ph.get("tpot_ms", {}).get("p99"), ph.get("requests"),
                        ph.get("finetune_tokens_per_s"), f"{ph['executor_busy_share']:.0%}"] for ph in phases])
    md += (f"\nPriority on: p99 TPOT {tpot_ratio:.2f}x idle (target <= {TARGETS['tpot_p99_ratio_max']}x); fine-tuning keeps {kept:.0%} "
           f"(target >= {TARGETS['finetune_kept_min']:.0%}); inference alone uses {idle['executor_busy_share']:.0%} of the executor's time "
           f"(target load <= {TARGETS['inference_share_max']:.0%}). Priority off: p99 TPOT "
           f"{result['targets']['tpot_p99_ratio_priority_off']:.2f}x, fine-tuning keeps {result['targets']['finetune_kept_priority_off']:.0%}.\n")

    def draw_tpot(out: Path) -> Path:
        with_inference = [ph for ph in phases if "tpot_ms" in ph]
        return common.chart(out / "coserve_tpot.png", "time per output token", "", "ms",
                            {q: ([ph["phase"] for ph in with_inference], [ph["tpot_ms"][q] for ph in with_inference]) for q in ("p50", "p99")},
                            kind="bar")

    def draw_finetune(out: Path) -> Path:
        with_train = [ph for ph in phases if "finetune_tokens_per_s" in ph]
        return common.chart(out / "coserve_finetune.png", "fine-tuning throughput (4 jobs)", "", "tokens/s",
                            {"fine-tuning": ([ph["phase"] for ph in with_train], [ph["finetune_tokens_per_s"] for ph in with_train])}, kind="bar")

    common.write(args, "coserve", result, md, [draw_tpot, draw_finetune])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
