"""Server latency with and without a fine-tuning job on the same executor (and the job's speed).

    python bench/symbiosis_coserve.py [--requests 20] [--out bench/results]

One in-process executor of a small random Llama (hidden 256, 4 layers, vocabulary 512, with the
tiny tokenizer); the OpenAI server (uvicorn on loopback, two adapters: LoRA and prefix tuning) is
queried with the official ``openai`` client; the fine-tuning job trains LoRA on the example chat
data at training priority. Phases: (1) server alone, (2) fine-tuning alone, (3) both at once.
Latencies are end-to-end HTTP times of chat completions with 16 new tokens (greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai
from transformers import AutoTokenizer

from symbiosis import BaseExecutor
from symbiosis.executor_ref import ExecutorRef
from symbiosis.finetune import FineTuneConfig, FineTuneJob, method_config
from symbiosis.serving import HttpServer, ModelRegistry, create_app
from symbiosis.tiny import save_tiny_model_with_tokenizer

DATA = Path(__file__).resolve().parents[1] / "examples" / "symbiosis" / "data"
QUESTION = [{"role": "user", "content": "What is the opposite of early?"}]
SIZES = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(samples), "p50_ms": statistics.median(samples), "p90_ms": pick(0.9), "max_ms": ordered[-1]}


def chat_latencies(client: openai.OpenAI, count: int, models: list[str]) -> list[float]:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        client.chat.completions.create(model=models[i % len(models)], messages=QUESTION, max_tokens=16, temperature=0)
        samples.append(1e3 * (time.perf_counter() - start))
    return samples


def make_adapters(model_dir: Path, root: Path, executor: ExecutorRef, tokenizer) -> dict[str, Path]:
    """Two small adapters (LoRA, prefix tuning), trained for a few steps so they are not identities."""
    adapters = {}
    for name, method in (("lora", "lora"), ("prefix", "prefix-tuning")):
        config = FineTuneConfig(data=[DATA / "qa.jsonl"], output=root / name, peft=method_config(method, num_virtual_tokens=8), max_steps=3)
        adapters[name] = FineTuneJob(config, executor, tokenizer).run(progress=False).adapter_dir
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps per phase")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model_dir = save_tiny_model_with_tokenizer(root / "base", **SIZES)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        executor = ExecutorRef(BaseExecutor.from_pretrained(model_dir))
        adapters = make_adapters(model_dir, root, executor, tokenizer)
        registry = ModelRegistry(executor, tokenizer, base_name="base")
        for name, path in adapters.items():
            registry.load_adapter(name, path)
        server = HttpServer(create_app(registry), port=0).start()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        models = ["lora", "prefix"]

        def job(name: str) -> FineTuneJob:
            config = FineTuneConfig(data=[DATA / "chat.jsonl"], output=root / name, peft=method_config("lora"), max_steps=args.steps, batch_size=8, save_every=args.steps, eval_fraction=0)
            return FineTuneJob(config, executor, tokenizer)

        chat_latencies(client, 3, models)  # warm-up
        alone = chat_latencies(client, args.requests, models)
        start = time.perf_counter()
        job("train-alone").run(progress=False)
        train_alone_s = time.perf_counter() - start

        during_job = job("train-shared")
        trainer = threading.Thread(target=during_job.run, kwargs={"progress": False})
        start = time.perf_counter()
        trainer.start()
        during = []
        while trainer.is_alive():
            during += chat_latencies(client, 1, models[len(during) % 2 :])
        trainer.join()
        train_shared_s = time.perf_counter() - start
        server.stop()
        registry.close()

    result = {
        "model": SIZES | {"vocab_size": 512},
        "latency_alone": percentiles(alone),
        "latency_during_finetuning": percentiles(during),
        "finetune_steps_per_s_alone": args.steps / train_alone_s,
        "finetune_steps_per_s_while_serving": args.steps / train_shared_s,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coserve.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
