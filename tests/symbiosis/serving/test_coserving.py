"""Inference and fine-tuning at once on one executor: the OpenAI server and a fine-tuning job share it.

Checked: both make progress at the same time, the server's requests reach the executor at inference
priority and the job's at training priority, chat latency while the job trains stays within a
generous multiple of the latency alone (measured in the same test, so a loaded machine slows both),
and the job's result is exactly what it computes alone. Run with ``-s`` to see the latencies.
"""

from __future__ import annotations

import statistics
import threading
import time

import openai
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from symbiosis import BaseExecutor
from symbiosis.executor_ref import ExecutorRef
from symbiosis.finetune import FineTuneConfig, FineTuneJob, method_config
from symbiosis.protocol import PRIORITY_INFERENCE, PRIORITY_TRAINING
from symbiosis.serving import HttpServer, ModelRegistry, create_app

from ..recording import RecordingTransport
from ..usermodels import EXAMPLE_DATA
from .adapters import ADAPTER_CONFIGS, save_adapter

QUESTION = [{"role": "user", "content": "What is the opposite of hot?"}]

#: Median chat latency while fine-tuning may be at most this many times the median alone. Measured:
#: ~1.8x on 2 CPU cores, set by the job's and the server's client-side work sharing the CPU and the
#: GIL. With one training client at most one training request waits at a time, so swapping the
#: priorities changes little here; the scheduler's ordering is tested in executor/test_scheduler.py.
#: The bound catches serving stalled behind the job: an answer sends dozens of op requests, and a
#: training step takes 25-50 ms here, so requests that waited out steps would exceed it many times.
LATENCY_BOUND = 5.0


def job_config(output, steps: int) -> FineTuneConfig:
    return FineTuneConfig(
        data=[EXAMPLE_DATA / "chat.jsonl"], output=output, peft=method_config("lora", r=4), max_steps=steps, batch_size=4, save_every=steps, eval_fraction=0
    )


def latencies_ms(client: openai.OpenAI, keep_going) -> list[float]:
    samples = []
    while keep_going(len(samples)):
        start = time.perf_counter()
        answer = client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=8, temperature=0)
        samples.append(1e3 * (time.perf_counter() - start))
        assert answer.choices[0].finish_reason in ("stop", "length")
    return samples


def test_finetuning_and_serving_progress_together_on_one_executor(chat_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    recorder = RecordingTransport(BaseExecutor.from_pretrained(chat_model_dir))
    shared = ExecutorRef(recorder)
    registry = ModelRegistry(shared, tokenizer, base_name="base")
    registry.load_adapter("chat", save_adapter(chat_model_dir, ADAPTER_CONFIGS["lora"], tmp_path / "chat", seed=1))
    server = HttpServer(create_app(registry), port=0).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        alone = latencies_ms(client, lambda n: n < 8)
        job = FineTuneJob(job_config(tmp_path / "shared", 30), shared, tokenizer)
        trainer = threading.Thread(target=job.run, kwargs={"progress": False})
        started = time.time()
        trainer.start()
        during = latencies_ms(client, lambda n: trainer.is_alive() and n < 200)
        finished_serving = time.time()
        trainer.join(timeout=300)
        alone += latencies_ms(client, lambda n: n < 8)  # before and after: a change in the machine's load shows in both
    finally:
        server.stop()
        registry.close()

    steps = [r for r in job.log.records() if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert sum(started <= r["time"] <= finished_serving for r in steps) >= 2, "training made no progress while serving"
    assert len(during) >= 2, "serving made no progress while training"

    server_ids = {f"openai:{m}" for m in ("base", "chat")}
    priorities: dict[str, set[int]] = {}
    for request in recorder.requests:
        priorities.setdefault("server" if request.client_id.rsplit(":", 1)[0] in server_ids else "job", set()).add(request.priority)
    assert priorities == {"server": {PRIORITY_INFERENCE}, "job": {PRIORITY_TRAINING}}
    kinds = [request.priority for request in recorder.requests]
    switches = sum(a != b for a, b in zip(kinds, kinds[1:]))
    assert switches >= 4, "inference and training requests never interleaved at the executor"

    # sharing the executor changed nothing in what the job computed
    alone_job = FineTuneJob(job_config(tmp_path / "alone", 30), ExecutorRef(recorder.executor), tokenizer)
    alone_job.run(progress=False)
    for name, tensor in load_file(tmp_path / "alone" / "adapter_model.safetensors").items():
        shared_tensor = load_file(tmp_path / "shared" / "adapter_model.safetensors")[name]
        assert torch.allclose(shared_tensor, tensor, rtol=1e-4, atol=1e-6), name

    def summary(samples: list[float]) -> str:
        return f"median {statistics.median(samples):.1f} ms, max {max(samples):.1f} ms over {len(samples)} requests"

    latencies = f"chat latency (8 tokens) alone: {summary(alone)}; during fine-tuning: {summary(during)}"
    print(f"\n{latencies}")
    assert statistics.median(during) <= LATENCY_BOUND * statistics.median(alone), latencies
