"""Experiment 2 — split overhead: one Symbiosis client + executor against the monolithic model.

The same LoRA adapter (r=8 on every linear layer, same seed) on three bases:
``monolithic`` (transformers + PEFT, in this process), ``split in-process`` (a ``BaseExecutor`` in this process,
``load_model`` client) and ``split via server`` (a ``symbiosis serve`` process on this host,
shared-memory transport with 128 MiB channels, its client in a process of its own; skip with
``--no-server``). Every system gets the whole machine: the monolithic model and the in-process
split run with ``--threads`` torch threads (default: one per core), the server with
``--server-threads`` (default: ``--threads``, as ``symbiosis serve`` itself) and its client with
``--client-threads`` (default: ``--threads``) and a short OpenMP spin (``--client-spin-count``,
default 2000: a client's idle OpenMP workers otherwise spin for milliseconds on the cores the
server's GEMMs need). Every process keeps the memory it frees (``--keep-freed-memory``, on here;
``--return-freed-memory``: glibc's default), so that no system pays this VM's page faults for a
buffer the host took back. Measured in interleaved rounds (every system once per round, repeated), reported as medians:

* training step: AdamW step on a batch of ``--batch`` x ``--seq-len`` tokens;
* decode: time per output token of greedy decoding (batch 1, 16-token prompt, ``--new-tokens``).

Targets (in-process and via server): training step <= 1.10x, decoded token <= 1.25x the monolithic model.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench import common
from bench.procs import start_server
from bench.workers import SHM_CAPACITY, adapted, greedy_decode, synchronize
from symbiosis.executor.ops import PACKED_DIRECTIONS

TARGETS = {"train_step": 1.10, "decode_token": 1.25}
#: The via-server client's OpenMP spin count (see ``docs/architecture-service.md``, "the client's threads").
CLIENT_SPIN_COUNT = 2000


def build(kind: str, model_dir: Path, args, address: str | None):
    """The LoRA model on base ``kind``."""
    from transformers import AutoModelForCausalLM

    from symbiosis import BaseExecutor, load_model

    if kind == "monolithic":
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype), device_map=args.device)
    elif kind == "split in-process":
        base = load_model(BaseExecutor.from_pretrained(model_dir, dtype=args.dtype, device=args.device, pack_weights=args.pack_weights), device=args.device)
    else:
        base = load_model(address, device=args.device, connect_options={"shm_capacity": SHM_CAPACITY})
    return adapted(base, "lora", seed=0)


def train_steps(model, batch: torch.Tensor, optimizer, steps: int) -> list[float]:
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(batch.device)
        times.append(time.perf_counter() - start)
    return times


def warm_up(model, batch: torch.Tensor, optimizer, prompt: torch.Tensor) -> None:
    """One training step and a short greedy decode, untimed: every system starts measuring warm."""
    train_steps(model, batch, optimizer, 1)
    greedy_decode(model.eval(), prompt, 3)


class ClientProcess:
    """The via-server client in a process of its own, as a real client runs: its own torch threads
    and its own OpenMP spin count (``GOMP_SPINCOUNT``, read once when a process loads OpenMP), so
    that neither leaks into the monolithic model measured in this process. Runs the same training
    steps and greedy decoding as ``train_steps`` / ``greedy_decode`` on command."""

    def __init__(self, spec: dict[str, Any], spin_count: int | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._commands, self._results = context.Queue(), context.Queue()
        saved = os.environ.get("GOMP_SPINCOUNT")
        if spin_count is not None:
            os.environ["GOMP_SPINCOUNT"] = str(spin_count)  # the child's environment at its start
        try:
            self._process = context.Process(target=_client_main, args=(spec, self._commands, self._results), daemon=True)
            self._process.start()
        finally:
            if saved is None:
                os.environ.pop("GOMP_SPINCOUNT", None)
            else:
                os.environ["GOMP_SPINCOUNT"] = saved
        self._answer()  # built and warmed up

    def train(self, steps: int) -> list[float]:
        self._commands.put(("train", steps))
        return self._answer()

    def decode(self, new_tokens: int) -> list[float]:
        self._commands.put(("decode", new_tokens))
        return self._answer()

    def close(self) -> None:
        self._commands.put(("stop", 0))
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()

    def _answer(self) -> Any:
        while True:
            try:
                kind, value = self._results.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(f"the via-server client exited with code {self._process.exitcode}") from None
        if kind == "error":
            raise RuntimeError(f"the via-server client failed:\n{value}")
        return value


def _client_main(spec: dict[str, Any], commands, results) -> None:
    import traceback
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if spec["keep_freed_memory"]:
            common.keep_freed_memory()
        torch.set_num_threads(spec["threads"])
        model = build("split via server", spec["model_dir"], spec["args"], spec["address"])
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        batch, prompt = spec["batch"], spec["prompt"]
        warm_up(model, batch, optimizer, prompt)
        results.put(("ok", None))
        while True:
            kind, count = commands.get()
            if kind == "stop":
                return
            times = train_steps(model, batch, optimizer, count) if kind == "train" else greedy_decode(model.eval(), prompt, count)
            results.put(("ok", times))
    except Exception:
        results.put(("error", traceback.format_exc(limit=8)))


def main(argv: list[str] | None = None) -> int:
    p = common.parser("split_overhead", __doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="training steps per system and round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-server", action="store_true", help="skip the split-via-server system")
    p.add_argument("--pack-weights", choices=list(PACKED_DIRECTIONS), default=False,
                   help="the split systems' executors keep prepacked weights for these products (serve --pack-weights)")
    p.add_argument("--client-threads", type=int, metavar="N", help="torch threads of the via-server client (default: --threads)")
    p.add_argument("--client-spin-count", type=int, default=CLIENT_SPIN_COUNT, metavar="N",
                   help=f"GOMP_SPINCOUNT of the via-server client's process (default {CLIENT_SPIN_COUNT}; -1: OpenMP's default, "
                        "300,000): how long its idle OpenMP workers spin, on the cores the server's GEMMs need, before they sleep")
    p.add_argument("--return-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="glibc's default: freed large blocks go back to the kernel (see --keep-freed-memory)")
    p.set_defaults(threads=os.cpu_count() or 1, malloc_mmap_threshold=0, keep_freed_memory=True)
    args = p.parse_args(argv)
    args.client_threads = args.client_threads or args.threads
    if args.smoke:
        args.rounds, args.steps, args.batch, args.seq_len, args.new_tokens = 1, 1, 2, 16, 4
    path = common.model_dir(args)
    start = common.start(args)
    client = None
    server = None if args.no_server else start_server(path, device=args.device, dtype=args.dtype, threads=args.server_threads,
                                                            options=["--pack-weights", args.pack_weights] if args.pack_weights else [])
    try:
        local = ["monolithic", "split in-process"]
        kinds = local + ([] if server is None else ["split via server"])
        torch.set_num_threads(args.threads)
        models = {k: build(k, path, args, None) for k in local}
        vocab = models["monolithic"].config.vocab_size
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen).to(args.device)
        prompt = torch.randint(3, vocab, (1, 16), generator=gen).to(args.device)
        optimizers = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for k, m in models.items()}
        for k, m in models.items():
            warm_up(m, batch, optimizers[k], prompt)
        if server is not None:
            spec = {"model_dir": path, "args": args, "address": server.address, "threads": args.client_threads,
                    "keep_freed_memory": args.keep_freed_memory, "batch": batch, "prompt": prompt}
            client = ClientProcess(spec, None if args.client_spin_count < 0 else args.client_spin_count)

        def train(kind: str) -> list[float]:
            return client.train(args.steps) if kind == "split via server" else train_steps(models[kind], batch, optimizers[kind], args.steps)

        def decode(kind: str) -> list[float]:
            return client.decode(args.new_tokens) if kind == "split via server" else greedy_decode(models[kind].eval(), prompt, args.new_tokens)

        step_s = {k: [] for k in kinds}
        token_s = {k: [] for k in kinds}
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for k in order:
                step_s[k] += train(k)
            for k in order:
                token_s[k] += decode(k)[1:]  # step 0 is the prefill
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
    mono_step, mono_token = statistics.median(step_s["monolithic"]), statistics.median(token_s["monolithic"])
    rows = []
    for k in kinds:
        step, token = statistics.median(step_s[k]), statistics.median(token_s[k])
        rows.append({"system": k, "train_step_s": step, "train_ratio": step / mono_step, "decode_token_ms": 1e3 * token,
                     "decode_ratio": token / mono_token, "train_steps_measured": len(step_s[k]), "tokens_measured": len(token_s[k])})
    met = {r["system"]: {"train": r["train_ratio"] <= TARGETS["train_step"], "decode": r["decode_ratio"] <= TARGETS["decode_token"]}
           for r in rows[1:]}
    result = {
        "model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": start,
        "config": {"batch": args.batch, "seq_len": args.seq_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
                   "steps_per_round": args.steps, "peft": "LoRA r=8, all linear layers", "threads": args.threads,
                   "server_threads": args.server_threads, "client_threads": args.client_threads,
                   "client_spin_count": args.client_spin_count, "pack_weights": args.pack_weights,
                   "keep_freed_memory": args.keep_freed_memory},
        "rows": rows,
        "samples_s": {"train_step": step_s, "decode_token": token_s},
        "targets": {"train_step_ratio_max": TARGETS["train_step"], "decode_token_ratio_max": TARGETS["decode_token"],
                    "met": met},
    }
    md = common.table(
        ["system", f"training step ({args.batch}x{args.seq_len}) s", "vs monolithic", "decode ms/token", "vs monolithic"],
        [[r["system"], r["train_step_s"], f"{r['train_ratio']:.3f}x", r["decode_token_ms"], f"{r['decode_ratio']:.3f}x"] for r in rows],
    ) + (f"\nThreads: monolithic and in-process {args.threads}, server {args.server_threads}, its client {args.client_threads} "
         f"(its own process, GOMP_SPINCOUNT {args.client_spin_count if args.client_spin_count >= 0 else 'default'}). "
         f"Targets: training step <= {TARGETS['train_step']}x, decoded token <= {TARGETS['decode_token']}x: "
         + "; ".join(f"{k} {'met' if v['train'] else 'missed'} / {'met' if v['decode'] else 'missed'}" for k, v in met.items()) + ".\n")

    def draw(out: Path) -> Path:
        return common.chart(out / "split_overhead.png", "split overhead (ratio to the monolithic model)", "", "x monolithic",
                            {"training step": ([r["system"] for r in rows], [r["train_ratio"] for r in rows]),
                             "decoded token": ([r["system"] for r in rows], [r["decode_ratio"] for r in rows])}, kind="bar")

    common.write(args, "split_overhead", result, md, [draw])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
