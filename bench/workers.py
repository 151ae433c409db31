"""Client workloads of the experiments, identical for Symbiosis and for the baselines.

A worker spec (a dict, so it pickles into a spawned process) says which base the client uses —
``"symbiosis"``: ``load_model(spec["target"])`` (a server address); ``"peft"``: its own copy,
``AutoModelForCausalLM.from_pretrained(spec["model_dir"])`` — which PEFT ``method`` (the load test's
configurations), and the workload: fine-tuning steps (``train_job``) or greedy decoding
(``decode_job``). Both sides then run the very same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bench.load_test import peft_config

#: Methods of fine-tuning jobs (mixed, in this order) and of decoding clients (K adapters).
FINETUNE_METHODS = ["lora", "ia3", "loha", "prefix_tuning", "lokr", "prompt_tuning", "adalora", "oft"]
#: Fine-tuning methods on a quantized base: those PEFT can put on bitsandbytes layers (it has no
#: quantized LoHa, LoKr or OFT), and the prompt-learning ones.
QLORA_METHODS = ["lora", "ia3", "prefix_tuning", "prompt_tuning", "adalora"]
DECODE_METHODS = ["lora", "ia3", "prefix_tuning"]
#: Bytes each way of a client's shared-memory channel: room for the LM head's rows of a training
#: batch (4 x 64 tokens x 32000 logits x 4 bytes = 33 MB); the default 8 MiB sends them over gRPC.
SHM_CAPACITY = 128 << 20


def base_model(spec: dict[str, Any], executor: Any = None) -> nn.Module:
    """The client's base model: a Symbiosis client of ``executor`` or ``spec["target"]``, or a full copy (``"peft"``).

    A full copy with ``spec["quantize"]`` (``"int8"``, ``"4bit"``) is a QLoRA user's: loaded with the
    executor's ``BitsAndBytesConfig``, then ``prepare_model_for_kbit_training`` (without gradient
    checkpointing, which neither side uses here).
    """
    if spec["system"] == "symbiosis":
        from symbiosis import load_model

        return load_model(executor if executor is not None else spec["target"], device=spec.get("device", "cpu"),
                          embeddings=spec.get("embeddings", "client"), priority=spec.get("priority"),
                          connect_options={"shm_capacity": SHM_CAPACITY})
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec.get("dtype", "float32"))
    if not spec.get("quantize"):
        return AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, device_map=spec.get("device", "cpu"))
    from peft import prepare_model_for_kbit_training

    from symbiosis.executor.quantized import load_options

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, device_map=spec.get("device", "cpu"),
                                                 **load_options(spec["model_dir"], spec["quantize"], dtype))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def adapted(base: nn.Module, method: str, seed: int) -> nn.Module:
    """``base`` with a fresh PEFT adapter of ``method`` (seeded)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, peft_config(method, steps=1000))


def vocab_size(model: nn.Module) -> int:
    return model.config.vocab_size


def idle_job(spec: dict[str, Any], ready: Callable[[], None]) -> dict[str, Any]:
    """Import what every client imports and do nothing: its peak RSS is the Python + torch runtime's cost."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import symbiosis  # noqa: F401

    ready()
    return {}


# ------------------------------------------------------------------------------------ fine-tuning
def train_job(spec: dict[str, Any], ready: Callable[[], None]) -> dict[str, Any]:
    """Fine-tune with AdamW on batches of ``batch`` x ``seq_len`` tokens; report each step's end time.

    One small warm-up step (a 1 x 16-token batch: first calls, optimizer state, the connection's
    buffers) runs before ``ready``, so the measured steps all start at the common start. Then runs at
    least ``spec["steps"]`` steps and keeps stepping until ``spec["duration_s"]`` (default 0) have
    passed since the common start.
    """
    from symbiosis.client import resident_bytes
    from symbiosis.workload import AffineTask

    base = base_model(spec)
    base_bytes = resident_bytes(base)
    model = adapted(base, spec["method"], spec["index"])
    task = AffineTask(vocab_size(model), a=1, b=spec["index"] + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    device = params[0].device
    model.train()

    def step(batch: torch.Tensor) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(task.sequences(1, min(16, spec["seq_len"]), seed=-1).to(device))
    ready()
    ends, losses = [], []
    start = time.time()
    until = start + spec.get("duration_s", 0.0)
    while len(ends) < spec["steps"] or time.time() < until:
        losses.append(step(task.sequences(spec["batch"], spec["seq_len"], seed=len(ends)).to(device)))
        ends.append(time.time())
    return {"method": spec["method"], "start": start, "step_ends": ends, "tokens_per_step": spec["batch"] * spec["seq_len"],
            "losses": losses, "base_bytes": base_bytes}


def tokens_in_window(report: dict[str, Any], t0: float, t1: float) -> float:
    """Training tokens a job processed between ``t0`` and ``t1`` (progress interpolated within a step)."""
    import numpy as np

    times = [report["start"], *report["step_ends"]]
    done = [i * report["tokens_per_step"] for i in range(len(times))]
    return float(np.interp(t1, times, done) - np.interp(t0, times, done))


def common_window(reports: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The interval in which every job was running: from the last start to the first job's last step end.

    Jobs warm up before the common start (``train_job``), so the interval holds measured steps only.
    """
    t0 = max(r["start"] for r in reports)
    t1 = min(r["step_ends"][-1] for r in reports)
    if t1 <= t0:
        raise ValueError(f"no interval in which every job was running (starts spread over {t0 - min(r['start'] for r in reports):.2f} s, "
                         f"steps per job: {[len(r['step_ends']) for r in reports]}); run more steps or a longer duration")
    return t0, t1


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a GPU, so that wall-clock timings include it (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- decoding
def greedy_decode(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, adapter_names: list[str] | None = None) -> list[float]:
    """Greedy decoding of ``prompts`` (``[rows, length]``) with a KV cache; returns each step's seconds.

    The prompt is prefilled through the (PEFT) model, so prompt-learning methods put their virtual
    tokens or prefix into the cache; decode steps then run on the adapted base model (the cache
    already holds the prefix), or through the PEFT model when ``adapter_names`` selects an adapter
    per row (PEFT's mixed-adapter batch). Step 0 is the prefill (time to first token).
    """
    from peft import PeftModel

    stepper = model.get_base_model() if isinstance(model, PeftModel) and adapter_names is None else model
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    times = []
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=prompts, attention_mask=torch.ones_like(prompts), use_cache=True, logits_to_keep=1, **extra)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(token.device)
        times.append(time.perf_counter() - start)
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            length = cache.get_seq_length()
            mask = torch.ones(prompts.shape[0], length + 1, dtype=torch.long, device=prompts.device)
            out = stepper(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, **extra)
            cache = out.cache
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            synchronize(token.device)
            times.append(time.perf_counter() - start)
    return times


def decode_requests(model: nn.Module, spec: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """``spec["requests"]`` greedy requests (``rows`` x ``prompt_len`` prompt, ``new_tokens`` each).

    With ``spec["rate"]`` (requests/s), request i starts at ``spec["t0"] + i / rate`` (open loop) or
    as soon as the previous one ends, whichever is later; ``spec["until"]`` stops issuing requests.
    """
    vocab = vocab_size(model)
    generator = torch.Generator().manual_seed(seed)
    device = next(p.device for p in model.parameters())
    t0, results = spec.get("t0") or time.time(), []
    for i in range(spec["requests"]):
        if spec.get("rate"):
            time.sleep(max(0.0, t0 + i / spec["rate"] - time.time()))
        if time.time() >= spec.get("until", float("inf")):
            break
        prompts = torch.randint(3, vocab, (spec.get("rows", 1), spec["prompt_len"]), generator=generator).to(device)
        begin = time.time()
        steps = greedy_decode(model, prompts, spec["new_tokens"], adapter_names=spec.get("adapter_names"))
        results.append({"start": begin, "steps_s": steps, "tokens": prompts.shape[0] * len(steps)})
    return results


def decode_job(spec: dict[str, Any], ready: Callable[[], None]) -> dict[str, Any]:
    """One decoding client (its own adapter) in this process; see ``decode_requests``.

    ``spec["duration_s"]``, if given, stops issuing requests that long after the common start.
    """
    model = adapted(base_model(spec), spec["method"], spec["index"]).eval()
    decode_requests(model, dict(spec, requests=1, new_tokens=2, rate=0), spec["index"])  # warm-up
    ready()
    start = time.time()
    run = dict(spec, t0=start, until=start + spec.get("duration_s", float("inf")))
    requests = decode_requests(model, run, spec["index"])
    return {"method": spec["method"], "start": start, "end": time.time(), "requests": requests}


def in_process_executor(spec: dict[str, Any], *, pack_weights: bool = False) -> Any:
    """A ``BaseExecutor`` of ``spec["model_dir"]`` in this process (``spec["dtype"]``, ``spec["device"]``)."""
    from symbiosis import BaseExecutor

    return BaseExecutor.from_pretrained(spec["model_dir"], dtype=spec.get("dtype", "float32"), device=spec.get("device", "cpu"), pack_weights=pack_weights)


def save_adapters(model_dir: str, methods: Sequence[str], count: int, root: Any) -> list[Any]:
    """``count`` fresh adapters (methods in turn, adapter i seeded with i) saved in PEFT format under ``root``."""
    from pathlib import Path

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base, paths = AutoModelForCausalLM.from_pretrained(model_dir), []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(base, peft_config(methods[i % len(methods)], steps=1000))
        model.save_pretrained(Path(root) / f"a{i}")
        paths.append(Path(root) / f"a{i}")
        base = model.get_base_model() if model.active_peft_config.is_prompt_learning else model.unload()
    return paths


def engine_job(spec: dict[str, Any], ready: Callable[[], None]) -> dict[str, Any]:
    """``spec["clients"]`` greedy requests, one per adapter (``spec["methods"]`` in turn), served together by
    one serving engine on a Symbiosis client of an executor in this process: one forward per step over
    every sequence. Each request's ``steps_s`` are its time to first token and then each token's gap."""
    import gc
    import queue
    import tempfile

    from transformers import AutoTokenizer

    from symbiosis import load_model
    from symbiosis.serving import Engine, GenerationRequest, SamplingParams, read_adapter

    executor = in_process_executor(spec, pack_weights=True)  # as serve-openai's own executor
    client = load_model(executor, device=spec.get("device", "cpu"), embeddings=spec.get("embeddings", "client"), priority="inference")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    except (OSError, ValueError):  # a model directory without a tokenizer: token ids only
        tokenizer = None
    engine = Engine(client, tokenizer, eos_ids=[], max_seqs=max(spec["clients"], 1), max_adapters=max(spec["clients"], 1))
    with tempfile.TemporaryDirectory() as scratch:
        infos = [read_adapter(f"a{i}", path) for i, path in enumerate(save_adapters(spec["model_dir"], spec["methods"], spec["clients"], scratch))]
        for info in infos:
            engine.adapters.register(info)
            engine.adapters.offer(engine.adapters.load(info))
    vocab = client.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def run(new_tokens: int) -> list[dict[str, Any]]:
        events: queue.Queue = queue.Queue()
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        prompts = torch.randint(3, vocab, (len(infos), spec["prompt_len"]), generator=generator).tolist()
        requests = [GenerationRequest(p, params, events.put, adapter=info, first_choice=i, stream=True) for i, (p, info) in enumerate(zip(prompts, infos))]
        begin = time.time()
        engine.submit(*requests)
        times: dict[int, list[float]] = {i: [] for i in range(len(requests))}
        finished = 0
        while finished < len(requests):
            event = events.get(timeout=600)
            if event.error is not None:
                raise event.error
            times[event.choice] += [time.time()] * len(event.token_ids)
            finished += event.finish_reason is not None
        return [{"start": begin, "steps_s": [t[0] - begin] + [b - a for a, b in zip(t, t[1:])], "tokens": len(t)} for t in times.values()]

    run(2)  # warm-up: first calls
    gc.freeze()  # as serve-openai does once it serves
    executor.stats.reset()
    ready()
    start = time.time()
    requests = run(spec["new_tokens"])
    report = {"methods": [spec["methods"][i % len(spec["methods"])] for i in range(len(infos))], "start": start, "end": time.time(),
              "requests": requests, "executor": executor.stats.total(), "engine_steps": engine.stats.steps}
    engine.close()
    engine.join(timeout=60)
    return report


def mixed_batch_job(spec: dict[str, Any], ready: Callable[[], None]) -> dict[str, Any]:
    """PEFT's own multi-adapter inference: one base, ``clients`` LoRA adapters, one batch with a row per adapter.

    The base is a full copy (``spec["system"]`` ``"peft"``, the default) or a Symbiosis client of an
    executor in this process (``"symbiosis"``): then every op of a decode step carries all rows.
    """
    from peft import get_peft_model

    executor = in_process_executor(spec) if spec.get("system") == "symbiosis" else None
    base = base_model(dict(spec, system=spec.get("system", "peft")), executor)
    model = None
    for i in range(spec["clients"]):
        torch.manual_seed(i)
        if model is None:
            model = get_peft_model(base, peft_config("lora", 1000), adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", peft_config("lora", 1000))
    model.eval()
    names = [f"a{i}" for i in range(spec["clients"])]
    run = dict(spec, rows=len(names), adapter_names=names)
    decode_requests(model, dict(run, requests=1, new_tokens=2, rate=0), 0)  # warm-up
    if executor is not None:
        executor.stats.reset()
    ready()
    start = time.time()
    requests = decode_requests(model, run, 0)
    report = {"method": "lora (mixed batch)", "start": start, "end": time.time(), "requests": requests}
    if executor is not None:
        report["executor"] = executor.stats.total()
    return report
