"""Experiment 3 — multi-adapter decoding: K clients, each with its own adapter, generating at once.

Every client decodes one greedy request (``--prompt-len`` prompt, ``--new-tokens`` new tokens,
batch 1); all start together. Systems, in the same run:

* ``symbiosis``: one process holding the executor and the serving engine of ``symbiosis
  serve-openai`` (without HTTP) with K adapters (LoRA, IA3, prefix tuning in turn), the K requests
  submitted together: one forward per step over all K sequences, each adapter on its own rows.
* ``peft processes``: K transformers + PEFT processes, each with its own base copy and adapter
  (same methods), as far as the memory budget allows.
* ``peft mixed batch``: one transformers + PEFT process, K LoRA adapters, one batch of K rows with
  ``adapter_names`` (PEFT's mixed-adapter inference; LoRA only).
* ``vllm``: vLLM's CPU build (own venv, see ``bench.vllm_env``) with K LoRA adapters (LoRA only);
  one engine, configured for the largest K, runs every K (``bench/vllm_runner.py``).
* ``roofline``: this machine's ceiling for one forward per step over K rows of the base model (no
  adapters, no serving): ``gemms`` only the step's matrix products (one ``torch.mm`` per linear
  weight, LM head included, weights streamed from memory as in decoding: nothing else of a
  forward), ``packed gemms`` the same products on prepacked weights as the engine's executor
  computes them (``FrozenOp.pack``), and ``forward`` the monolithic transformers model at batch K
  with a static KV cache; each with ``--threads`` and with every core (``--roofline-threads``).
  Whatever shares the base one forward per step can at best reach the faster of the GEMM lines.

Reported: aggregate tokens/s (tokens generated / wall time from the common start to the last
client's end), time per output token (decode steps, without the prefill) p50/p99, peak memory.
Targets at K = 16: >= 5x the K-process baseline, >= PEFT's mixed batch, >= vLLM; the report also
gives the rooflines over the K-process baseline (the most any shared-base system could reach).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common, vllm_env
from bench.procs import REPO, MemorySampler, run_workers
from bench.workers import DECODE_METHODS, decode_job, engine_job, mixed_batch_job, synchronize

GIB = 2**30
ROOFLINES = ("gemms", "packed gemms", "forward")
TARGETS = {"vs_processes_min": 5.0, "vs_mixed_batch_min": 1.0, "vs_vllm_min": 1.0}


def measure(system: str, k: int, job, specs: list[dict]) -> dict:
    """Run ``job`` in one process per spec and summarise it as ``system`` at K; ``elapsed_s`` is the
    run's whole time (process start-up and warm-up included)."""
    began = time.time()
    run = run_workers(job, specs)
    return {**summarise(system, k, run.reports, run.peak_rss_sum), "elapsed_s": time.time() - began}


def summarise(system: str, k: int, reports: list[dict], peak_rss: float) -> dict:
    """Aggregate tokens/s over [first start, last end] and TPOT percentiles over every decode step."""
    requests = [q for r in reports for q in r["requests"]]
    start, end = min(r["start"] for r in reports), max(r["end"] for r in reports)
    steps = [s for q in requests for s in q["steps_s"][1:]]
    tokens = sum(q["tokens"] for q in requests)
    return {"system": system, "k": k, "tokens": tokens, "wall_s": end - start, "aggregate_tokens_per_s": tokens / (end - start),
            "tpot_ms": common.percentiles(steps, 1e3), "ttft_ms": common.percentiles([q["steps_s"][0] for q in requests], 1e3),
            "peak_rss_sum_gib": peak_rss / GIB, **({"executor": reports[0]["executor"]} if "executor" in reports[0] else {})}


def roofline_job(spec: dict, ready) -> dict:
    """The ceilings of one base forward per step over ``spec["clients"]`` rows (see the module docstring),
    one after the other: ``new_tokens`` steps each, every step timed; step 0 of ``forward`` is the prefill."""
    import torch
    from transformers import AutoModelForCausalLM, StaticCache

    from symbiosis.executor.ops import FrozenOp
    from symbiosis.protocol import Direction, OpInfo, OpKind

    dtype, device = getattr(torch, spec["dtype"]), spec["device"]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(device).eval()
    rows, steps = spec["clients"], spec["new_tokens"]
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dtype, device=device) for w in weights}
    products = [(inputs[w.shape[1]], w.t()) for w in weights]
    packed = []
    for w in weights:
        op = FrozenOp(OpInfo("w", OpKind.LINEAR, w.shape[1], w.shape[0]), w.detach())
        op.pack()
        packed.append((inputs[w.shape[1]], op))
    prompts = torch.randint(3, model.config.vocab_size, (rows, spec["prompt_len"]), generator=torch.Generator().manual_seed(0)).to(device)

    def gemms(step: int, state: dict) -> None:
        for x, w in products:
            torch.mm(x, w)

    def packed_gemms(step: int, state: dict) -> None:
        for x, op in packed:
            op.apply(Direction.FORWARD, x)

    def forward(step: int, state: dict) -> None:
        if step == 0:  # prefill
            state["cache"] = StaticCache(config=model.config, max_cache_len=spec["prompt_len"] + steps)
            ids, position = prompts, torch.arange(prompts.shape[1], device=device)
        else:
            ids, position = state["token"], state["position"][-1:] + 1
        logits = model(input_ids=ids, past_key_values=state["cache"], cache_position=position, use_cache=True, logits_to_keep=1).logits
        state["token"], state["position"] = logits[:, -1].argmax(-1, keepdim=True), position

    def run(step_fn, count: int) -> dict:
        times, state, start = [], {}, time.time()
        with torch.no_grad():
            for i in range(count):
                begin = time.perf_counter()
                step_fn(i, state)
                synchronize(device)
                times.append(time.perf_counter() - begin)
        return {"start": start, "end": time.time(), "requests": [{"start": start, "steps_s": times, "tokens": rows * count}]}

    for fn in (gemms, packed_gemms, forward):  # warm-up
        run(fn, 2)
    ready()
    return {"gemms": run(gemms, steps), "packed gemms": run(packed_gemms, steps), "forward": run(forward, steps)}


def save_lora_adapters(path: Path, k: int, scratch: Path) -> list[str]:
    """K LoRA adapters (the load test's LoRA config; adapter i initialised with seed i) saved in PEFT format, for vLLM.

    One PEFT model whose adapter is re-initialised and saved K times: adding K adapters to one model
    and saving each costs O(K^2) (100 s for K = 64).
    """
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from bench.load_test import peft_config

    config = peft_config("lora", 1000)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    dirs = []
    for i in range(k):
        if i:
            torch.manual_seed(i)
            for layer in layers:
                layer.reset_lora_parameters("default", config.init_lora_weights)
        model.save_pretrained(scratch / f"a{i}")
        dirs.append(str(next((scratch / f"a{i}").rglob("adapter_config.json")).parent))
    return dirs


def run_vllm(python: Path, path: Path, ks: list[int], args, scratch: Path) -> list[dict]:
    """vLLM in its venv: one engine for up to max(ks) adapters, then each K; its memory is the sampled
    peak of its process tree over the whole run (the engine reserves its KV cache up front)."""
    most = max(ks)
    adapters = save_lora_adapters(path, most, scratch / "adapters")
    out = scratch / "vllm.json"
    command = [str(python), str(REPO / "bench" / "vllm_runner.py"), "--model-dir", str(path), "--adapters", *adapters,
               "--k", *map(str, ks), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
               "--out", str(out), "--repeats", "1" if args.smoke else "2",
               # its KV cache gets what is left of this share after the weights and K LoRA slots (K = 64 needs ~0.3)
               "--memory-fraction", f"{min(0.5, 0.1 + 0.0032 * most):.3f}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.engine_threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONPATH": ""}
    log = scratch / "vllm.log"
    with MemorySampler() as sampler:
        proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=scratch)
        sampler.pids.add(proc.pid)
        proc.wait(1800)
    if proc.returncode != 0:
        args.out.mkdir(parents=True, exist_ok=True)
        kept = args.out / log.name
        shutil.copyfile(log, kept)
        causes = [line.strip() for line in log.read_text().splitlines() if re.search(r"\b\w*(Error|Exception)\b:", line)]
        raise RuntimeError(f"vLLM exited {proc.returncode}; first error: {causes[0] if causes else 'none logged'} (log: {kept})")
    return [{"system": "vllm", "k": r["k"], "max_loras": r["max_loras"], "tokens": r["generated_tokens"], "wall_s": r["wall_s"],
             "aggregate_tokens_per_s": r["aggregate_tokens_per_s"], "tpot_ms": {"p50": r["tpot_ms"], "note": "(wall(N) - wall(1)) / (N - 1)"},
             "ttft_ms": {"p50": 1e3 * r["first_token_s"]}, "peak_rss_sum_gib": sampler.peak_rss_sum / GIB, "sampled_peak_only": True}
            for r in json.loads(out.read_text())]


def main(argv: list[str] | None = None) -> int:
    p = common.parser("multi_adapter_decode", __doc__)
    p.add_argument("--k", type=int, nargs="+", default=[1, 4, 16, 64], help="numbers of clients / adapters")
    p.add_argument("--budget-gib", type=float, default=12.0, help="memory budget of the K-process baseline")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per client (default 16)")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM baseline")
    p.add_argument("--roofline-threads", type=int, default=os.cpu_count(), help="torch threads of the second roofline (default: every core)")
    p.add_argument("--engine-threads", type=int, help="torch threads of the one-process systems: the engine, PEFT's mixed batch, vLLM "
                                                      "(default: every core; the K processes keep --threads each and together fill the cores)")
    # a decoding experiment measures throughput as deployed processes run, with glibc's dynamic mmap
    # threshold: with a fixed 64 KiB one, a batched forward's activations (16 rows x 2048 x 4 bytes = 128
    # KiB) are mapped and unmapped on every op (measured: engine step 76.7 ms against 61.9 ms)
    p.set_defaults(malloc_mmap_threshold=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.k, args.new_tokens, args.roofline_threads, args.engine_threads = [2], 4, args.threads, args.threads
    args.engine_threads = args.engine_threads or os.cpu_count()
    path = common.model_dir(args)
    start = common.start(args)
    began = time.time()
    vllm_python, vllm_status = (None, "skipped (--no-vllm)") if args.no_vllm else vllm_env.ensure()
    base = {"model_dir": str(path), "device": args.device, "dtype": args.dtype, "threads": args.threads, "requests": 1,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    rows, skipped, one_process_gib, vllm_seconds = [], [], None, None
    with tempfile.TemporaryDirectory(prefix="symbiosis-bench-") as tmp:
        scratch = Path(tmp)
        for k in args.k:
            rows.append(measure("symbiosis", k, engine_job,
                                [dict(base, system="symbiosis", embeddings="executor", clients=k, methods=DECODE_METHODS, threads=args.engine_threads)]))
            if one_process_gib is None or k * one_process_gib <= args.budget_gib:
                specs = [dict(base, system="peft", method=DECODE_METHODS[i % len(DECODE_METHODS)]) for i in range(k)]
                rows.append(measure("peft processes", k, decode_job, specs))
                one_process_gib = one_process_gib or rows[-1]["peak_rss_sum_gib"] / k
            else:
                skipped.append({"system": "peft processes", "k": k,
                                "reason": f"needs ~{k * one_process_gib:.1f} GiB ({one_process_gib:.2f} GiB per process) > budget {args.budget_gib:g} GiB"})
            rows.append(measure("peft mixed batch", k, mixed_batch_job, [dict(base, clients=k, threads=args.engine_threads)]))
            for threads in dict.fromkeys((args.threads, args.roofline_threads)):
                report = run_workers(roofline_job, [dict(base, clients=k, threads=threads)]).reports[0]
                rows += [summarise(f"roofline: {name}, {threads} thread{'s' if threads > 1 else ''}", k, [report[name]], report["peak_rss_bytes"])
                         for name in ROOFLINES]
        if vllm_python is not None:
            clock = time.time()
            try:
                rows.extend(run_vllm(vllm_python, path, args.k, args, scratch))
            except RuntimeError as exc:
                skipped.extend({"system": "vllm", "k": k, "reason": str(exc)} for k in args.k)
            vllm_seconds = time.time() - clock
        else:
            skipped.extend({"system": "vllm", "k": k, "reason": vllm_status} for k in args.k)
    rows.sort(key=lambda r: r["k"])  # stable: the systems keep their order within each K
    target_k = 16 if 16 in args.k else max(args.k)
    targets = targets_at(rows, target_k)
    result = {"model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": start, "vllm": vllm_status,
              "config": {k: getattr(args, k) for k in ("k", "budget_gib", "prompt_len", "new_tokens", "threads", "engine_threads", "roofline_threads", "malloc_mmap_threshold")},
              "rows": rows, "skipped": skipped, "targets": targets,
              "elapsed_s": time.time() - began, "vllm_elapsed_s": vllm_seconds}
    md = common.table(["system", "K", "aggregate tokens/s", "TPOT p50 ms", "TPOT p99 ms", "peak RSS GiB"],
                      [[r["system"], r["k"], r["aggregate_tokens_per_s"], r["tpot_ms"].get("p50"), r["tpot_ms"].get("p99"), r["peak_rss_sum_gib"]]
                       for r in rows])
    md += "".join(f"\nNot run: {s['system']} at K = {s['k']}: {s['reason'][:300]}" for s in skipped)
    md += "\n\n" + verdicts(f"Targets at K = {target_k}", targets)
    systems = list(dict.fromkeys(r["system"] for r in rows))

    def draw(metric: str, label: str, file: str):
        def plot(out: Path) -> Path:
            series = {s: ([r["k"] for r in rows if r["system"] == s], [metric_of(r, metric) for r in rows if r["system"] == s]) for s in systems}
            return common.chart(out / file, label, "clients K (one adapter each)", label, series, logx=True)
        return plot

    common.write(args, "multi_adapter_decode", result, md,
                 [draw("aggregate_tokens_per_s", "aggregate tokens/s", "multi_adapter_decode_throughput.png"),
                  draw("tpot_p50", "time per output token p50 (ms)", "multi_adapter_decode_tpot.png")])
    return 0


def verdicts(title: str, targets: dict) -> str:
    """One Markdown line: each comparison's ratio, its target and whether it is met; then the rooflines' ratios."""
    line = f"{title}: " + "; ".join(f"{name} {v['ratio']:.2f}x (target {v['target']}x, {'met' if v['met'] else 'missed'})"
                                    if v["ratio"] is not None else f"{name}: baseline not run"
                                    for name, v in targets["comparisons"].items()) + "\n"
    ceilings = {name: ratio for name, ratio in targets.get("rooflines_vs_peft_processes", {}).items() if ratio is not None}
    if ceilings:
        line += "\nCeilings over the K-process baseline: " + "; ".join(f"{name} {ratio:.2f}x" for name, ratio in ceilings.items()) + "\n"
    return line


def metric_of(row: dict, metric: str) -> float:
    return row["tpot_ms"].get("p50", np.nan) if metric == "tpot_p50" else row[metric]


def targets_at(rows: list[dict], k: int, ours_system: str = "symbiosis") -> dict:
    """``ours_system``'s aggregate tokens/s at K over each baseline's (the K-process baseline: at K, else its largest K)."""
    def best(system: str) -> dict | None:
        candidates = [r for r in rows if r["system"] == system and r["k"] <= k]
        return max(candidates, key=lambda r: r["k"], default=None)

    ours = next((r for r in rows if r["system"] == ours_system and r["k"] == k), None)
    comparisons = {}
    for name, system, target in (("vs peft processes", "peft processes", TARGETS["vs_processes_min"]),
                                 ("vs peft mixed batch", "peft mixed batch", TARGETS["vs_mixed_batch_min"]),
                                 ("vs vllm", "vllm", round(TARGETS["vs_vllm_min"], 3))):
        other = best(system)
        ratio = ours["aggregate_tokens_per_s"] / other["aggregate_tokens_per_s"] if ours and other else None
        comparisons[name] = {"target": target, "ratio": ratio, "baseline_k": other and other["k"], "met": ratio is not None and ratio >= target}
    processes = best("peft processes")
    ceilings = {r["system"]: r["aggregate_tokens_per_s"] / processes["aggregate_tokens_per_s"] if processes else None
                for r in rows if r["system"].startswith("roofline") and r["k"] == k}
    return {"k": k, "system": ours_system, "comparisons": comparisons, "rooflines_vs_peft_processes": ceilings}


if __name__ == "__main__":
    raise SystemExit(main())
