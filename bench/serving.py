"""Experiment 9 — the OpenAI server under load: ``symbiosis serve-openai`` against vLLM's CPU OpenAI server.

One load generator drives both servers over HTTP: C concurrent clients in a closed loop (each sends
its next request when its last one ended) for ``--duration`` seconds, streaming completions of
``--words``-word prompts (a different prompt each time, so no prefix cache helps), ``--max-tokens``
new tokens, temperature 0, ``ignore_eos`` (every request generates ``--max-tokens`` tokens on both
servers). Both serve the same model directory (a random Llama of 78M parameters with a real
tokenizer: hidden 768, 12 layers, 12 heads of 64, 4 key/value heads, float32) and the same LoRA
adapters (r = 8 on every linear layer).

Scenarios (``--scenarios``): ``lora4`` (requests spread over 4 LoRA adapters) at every ``--clients``;
``lora1`` (one LoRA adapter), ``base`` (the base model) and ``mixed`` (LoRA, IA3, prefix tuning and
prompt tuning; Symbiosis only: vLLM serves LoRA only) at 16 clients; ``prefix`` (the base model, every
prompt a shared ``--prefix-words``-word preamble before its own words, as a system prompt or an
evaluation's shared context) at 16 clients, also against Symbiosis with ``--no-prefix-caching``.

Reported per scenario, server and C: output tokens/s over the window, time to first token and time
per output token (p50, p99), completed requests; for Symbiosis, rows per executor GEMM and rows per
engine step (``/admin/stats``). vLLM runs from its own venv (``bench.vllm_env``).

    python -m bench.serving                       # everything (~10 min)
    python -m bench.serving --scenarios lora4 --clients 16 --duration 20 --no-vllm
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import common, vllm_env
from bench.procs import REPO

SCENARIOS = {"lora4": None, "lora1": [16], "base": [16], "mixed": [16], "prefix": [16]}
#: The benchmark model: the issue's 78M-parameter Llama with the tiny trained tokenizer.
MODEL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
             max_position_embeddings=2048)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def model_dir(args) -> Path:
    """``--model-dir``, or the benchmark model (smoke: a tiny one), built on first use and cached."""
    if args.model_dir is not None:
        return args.model_dir
    sizes = SMOKE_MODEL if args.smoke else MODEL
    path = common.CACHE / ("serving-smoke" if args.smoke else "serving-llama-78m")
    if not (path / "config.json").exists():
        from symbiosis.tiny import save_tiny_model_with_tokenizer

        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        save_tiny_model_with_tokenizer(tmp, "llama", vocab_size=2048, **sizes)
        tmp.replace(path)
    return path


def build_adapters(path: Path, root: Path) -> dict[str, Path]:
    """lora0..lora3 (r = 8, every linear layer, seeds 0..3), ia3, prefix and prompt tuning, saved in PEFT format."""
    import torch
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from bench.load_test import peft_config

    out = {}
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(path), peft_config("lora", 1000))
    layers = [m for m in lora.modules() if isinstance(m, LoraLayer)]
    for i in range(4):
        torch.manual_seed(i)
        for layer in layers:  # B random too (not PEFT's zeros), so each adapter changes the answers
            layer.reset_lora_parameters("default", True)
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        lora.save_pretrained(root / f"lora{i}")
        out[f"lora{i}"] = root / f"lora{i}"
    others = {
        "ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    }
    for name, config in others.items():
        get_peft_model(AutoModelForCausalLM.from_pretrained(path), config).save_pretrained(root / name)
        out[name] = root / name
    return out


def prompts(count: int, words: int, seed: int = 0) -> list[str]:
    """``count`` different prompts of ``words`` words drawn from the tiny corpus."""
    from symbiosis.tiny import tiny_corpus

    vocabulary = sorted(set(tiny_corpus().split()))
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(count)]


# ------------------------------------------------------------------------------------ servers
class Server:
    """A server process on a free port; ``url`` once it answers ``/v1/models``."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-1500:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} did not start within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def symbiosis_server(path: Path, adapters: dict[str, Path], args, scratch: Path, *, prefix_caching: bool = True) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "symbiosis.cli.main", "serve-openai", "--model", str(path), "--port", str(port), "--base-name", "base",
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.server_threads),
               "--max-seqs", str(max(args.clients)), *(f"--adapter={name}={p}" for name, p in adapters.items()),
               *([] if prefix_caching else ["--no-prefix-caching"])]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    name = "symbiosis" if prefix_caching else "symbiosis-nocache"
    return Server(name, command, env, scratch / f"{name}.log", port)


def vllm_server(python: Path, path: Path, adapters: dict[str, Path], args, scratch: Path) -> Server:
    port = free_port()
    loras = [f"{name}={p}" for name, p in adapters.items() if name.startswith("lora")]
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--served-model-name", "base", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", str(max(args.clients)), "--enable-lora", "--max-loras", "4",
               "--max-lora-rank", "8", "--lora-modules", *loras]
    env = {**os.environ, "PYTHONPATH": "", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": str(args.server_threads)}
    return Server("vllm", command, env, scratch / "vllm.log", port)


# ---------------------------------------------------------------------------- load generator
_REQUESTS = itertools.count()


async def closed_loop(url: str, models: list[str], clients: int, duration_s: float, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """``clients`` workers sending streamed completions back to back for ``duration_s``; tokens count
    when they arrive inside the window (the usage's count, spread over the chunks); TTFT and TPOT
    of every request that finished.

    aiohttp rather than httpx: the generator shares the 2 cores with the server it measures, and
    aiohttp parses a stream with far less CPU."""
    import aiohttp

    start = time.perf_counter()
    end = start + duration_s
    tokens_in_window, ttft, tpot, completed, errors = 0, [], [], 0, []

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens_in_window, completed
        while time.perf_counter() < end:
            i = next(_REQUESTS)  # shared by every window of the run: no prompt comes back (as long as texts last)
            body = {"model": models[i % len(models)], "prompt": texts[i % len(texts)], "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            sent, times, generated = time.perf_counter(), [], 0
            try:
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    if response.status != 200:
                        errors.append(f"{response.status}: {(await response.read())[:200]!r}")
                        continue
                    async for line in response.content:
                        if line.startswith(b"data: {"):
                            chunk = json.loads(line[6:])
                            if chunk.get("choices") and chunk["choices"][0].get("text"):
                                times.append(time.perf_counter())
                            if chunk.get("usage"):
                                generated = chunk["usage"]["completion_tokens"]
            except aiohttp.ClientError as exc:
                errors.append(repr(exc))
                continue
            if times:
                # a chunk may carry several tokens (text held back until it is whole): spread the count over them
                tokens_in_window += generated / len(times) * sum(t <= end for t in times)
                completed += 1
                ttft.append(times[0] - sent)
                if len(times) > 1:
                    tpot.append((times[-1] - times[0]) / (len(times) - 1))

    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    return {"clients": clients, "duration_s": duration_s, "tokens": tokens_in_window, "tokens_per_s": tokens_in_window / duration_s,
            "completed": completed, "ttft_ms": common.percentiles(ttft, 1e3), "tpot_ms": common.percentiles(tpot, 1e3), "errors": errors[:5],
            "error_count": len(errors)}


def admin_stats(url: str) -> dict[str, Any] | None:
    try:
        return httpx.get(f"{url}/admin/stats", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None


def engine_figures(before: dict | None, after: dict | None) -> dict[str, float]:
    """Rows per executor GEMM and rows per engine step over one window (Symbiosis's ``/admin/stats``)."""
    if not before or not after:
        return {}
    ex0, ex1, en0, en1 = before["executor"], after["executor"], before["engine"], after["engine"]
    gemms, steps = ex1["gemms"] - ex0["gemms"], en1["steps"] - en0["steps"]
    return {"rows_per_gemm": (ex1["rows"] - ex0["rows"]) / max(gemms, 1), "rows_per_step": (en1["rows"] - en0["rows"]) / max(steps, 1),
            "steps": steps, "mixed_adapter_steps": en1["mixed_steps"] - en0["mixed_steps"],
            "prefix_cached_tokens": en1["cached_tokens"] - en0["cached_tokens"], "prompt_rows": en1["prefill_rows"] - en0["prefill_rows"]}


def measure(server: Server, scenario: str, clients: list[int], models: list[str], args, texts: list[str]) -> list[dict[str, Any]]:
    rows = []
    if scenario == "prefix":
        preamble = prompts(1, args.prefix_words, seed=1)[0]
        texts = [f"{preamble} {text}" for text in texts]
    for c in clients:
        asyncio.run(closed_loop(server.url, models, c, args.warmup, texts, args.max_tokens))  # warm-up: first calls, adapter loads
        before = admin_stats(server.url) if server.name.startswith("symbiosis") else None
        result = asyncio.run(closed_loop(server.url, models, c, args.duration, texts, args.max_tokens))
        result |= {"server": server.name, "scenario": scenario, "server_threads": args.server_threads, **engine_figures(before, admin_stats(server.url) if before else None)}
        print(f"{server.name:9s} {scenario:6s} C={c:3d}: {result['tokens_per_s']:7.1f} tokens/s, TTFT p50 {result['ttft_ms'].get('p50', 0):7.0f} ms, "
              f"TPOT p50 {result['tpot_ms'].get('p50', 0):6.1f} ms, errors {result['error_count']}", flush=True)
        rows.append(result)
    return rows


def scenario_models(scenario: str) -> list[str]:
    return {"lora4": ["lora0", "lora1", "lora2", "lora3"], "lora1": ["lora0"], "base": ["base"], "mixed": ["lora0", "ia3", "prefix", "prompt"],
            "prefix": ["base"]}[scenario]


def run_server(server: Server, scenarios: list[str], args, texts: list[str]) -> list[dict[str, Any]]:
    rows = []
    try:
        server.wait_ready(args.start_timeout)
        for scenario in scenarios:
            rows += measure(server, scenario, SCENARIOS[scenario] or args.clients, scenario_models(scenario), args, texts)
    finally:
        server.stop()
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Symbiosis over vLLM per (scenario, C), and the mixed-methods run over the one-LoRA run."""
    def find(server: str, scenario: str, c: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["scenario"] == scenario and r["clients"] == c), None)

    out = []
    for r in rows:
        if r["server"] != "symbiosis":
            continue
        other = find("vllm", r["scenario"], r["clients"])
        if other and other["tokens_per_s"]:
            target = {"lora4": 1.0, "base": 0.8}.get(r["scenario"])
            ratio = r["tokens_per_s"] / other["tokens_per_s"]
            out.append({"comparison": f"{r['scenario']} C={r['clients']}: symbiosis / vllm", "ratio": ratio, "target": target,
                        "met": None if target is None else ratio >= target})
    cached, uncached = find("symbiosis", "prefix", 16), find("symbiosis-nocache", "prefix", 16)
    if cached and uncached and uncached["tokens_per_s"]:
        out.append({"comparison": "prefix C=16: prefix caching / none (symbiosis)", "ratio": cached["tokens_per_s"] / uncached["tokens_per_s"],
                    "target": None, "met": None})
    mixed, lora1 = find("symbiosis", "mixed", 16), find("symbiosis", "lora1", 16)
    if mixed and lora1 and lora1["tokens_per_s"]:
        ratio = mixed["tokens_per_s"] / lora1["tokens_per_s"]
        out.append({"comparison": "mixed C=16 / lora1 C=16 (symbiosis)", "ratio": ratio, "target": 0.9, "met": ratio >= 0.9})
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser("serving", __doc__)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrent clients of the lora4 scenario")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per point (default 30)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before each measured window (default 5)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--words", type=int, default=12, help="words per prompt (default 12)")
    p.add_argument("--prefix-words", type=int, default=200, help="words of the shared preamble of the prefix scenario (default 200)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM server")
    args = p.parse_args(argv)
    # the servers' threads (OMP_NUM_THREADS for vLLM): every core unless told; with one, serve-openai's GEMMs
    # leave a core idle (base at 16 clients, 2026-12-04: 100 tokens/s on 1 thread against vLLM's 171)
    args.server_threads = args.server_threads or os.cpu_count()
    if args.smoke:
        args.clients, args.duration, args.warmup, args.max_tokens, args.scenarios = [2], 2.0, 1.0, 4, ["lora4", "mixed"]
        args.no_vllm = True
    path = model_dir(args)
    load = common.start(args)
    began = time.time()
    vllm_python, vllm_status = (None, "skipped (--no-vllm)") if args.no_vllm else vllm_env.ensure()
    texts = prompts(16384, args.words)
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="symbiosis-serving-") as tmp:
        scratch = Path(tmp)
        adapters = build_adapters(path, scratch / "adapters")
        rows += run_server(symbiosis_server(path, adapters, args, scratch), args.scenarios, args, texts)
        if "prefix" in args.scenarios:
            rows += run_server(symbiosis_server(path, adapters, args, scratch, prefix_caching=False), ["prefix"], args, texts)
        vllm_scenarios = [s for s in args.scenarios if s != "mixed"]
        if vllm_python is not None and vllm_scenarios:
            try:
                rows += run_server(vllm_server(vllm_python, path, adapters, args, scratch), vllm_scenarios, args, texts)
            except RuntimeError as exc:
                skipped.append({"server": "vllm", "reason": str(exc)[:2000]})
        elif vllm_python is None:
            skipped.append({"server": "vllm", "reason": vllm_status})
    result = {"model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": load, "vllm": vllm_status,
              "config": {k: getattr(args, k) for k in ("scenarios", "clients", "duration", "warmup", "max_tokens", "words", "prefix_words")},
              "rows": rows, "skipped": skipped, "targets": targets(rows), "elapsed_s": time.time() - began}
    md = common.table(["scenario", "clients", "server", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "requests",
                       "rows/GEMM", "rows/step"],
                      [[r["scenario"], r["clients"], r["server"], r["tokens_per_s"], r["ttft_ms"].get("p50"), r["ttft_ms"].get("p99"),
                        r["tpot_ms"].get("p50"), r["tpot_ms"].get("p99"), r["completed"], r.get("rows_per_gemm"), r.get("rows_per_step")]
                       for r in rows])
    md += "\n" + common.table(["comparison", "ratio", "target", "met"],
                              [[c["comparison"], c["ratio"], c["target"], {True: "yes", False: "no"}.get(c["met"])] for c in result["targets"]])
    md += "".join(f"\nNot run: {s['server']}: {s['reason'][:300]}" for s in skipped)

    def throughput(out: Path) -> Path:
        series = {}
        for server in ("symbiosis", "vllm"):
            points = [r for r in rows if r["server"] == server and r["scenario"] == "lora4"]
            if points:
                series[f"{server} (4 LoRA adapters)"] = ([r["clients"] for r in points], [r["tokens_per_s"] for r in points])
        return common.chart(out / "serving_throughput.png", "output tokens/s, 4 LoRA adapters", "concurrent clients", "tokens/s", series, logx=True)

    common.write(args, "serving", result, md, [throughput])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
