"""Fine-tuning and serving against a sharded base: two executor servers, each holding half the layers,
reached through ``symbiosis://`` addresses exactly as ``--executor A --executor B`` passes them
(the server keeping its embedding table on the executor)."""

from __future__ import annotations

import openai
from transformers import AutoTokenizer

from symbiosis import BaseExecutor
from symbiosis.executor_ref import ExecutorRef
from symbiosis.finetune import FineTuneConfig, FineTuneJob, method_config
from symbiosis.server import ExecutorServer
from symbiosis.serving import HttpServer, ModelRegistry, create_app

from ..usermodels import EXAMPLE_DATA
from .adapters import greedy_reference, monolithic

QUESTION = [{"role": "user", "content": "How do you say cat in French?"}]


def test_finetune_then_serve_on_a_sharded_remote_base(chat_model_dir, tmp_path):
    shards = [BaseExecutor.from_pretrained(chat_model_dir, layers=r) for r in ((0, 1), (1, 2))]
    servers = [ExecutorServer(shard).start() for shard in shards]
    try:
        remote = ExecutorRef.open(addresses=[s.url for s in servers])
        tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
        config = FineTuneConfig(data=[EXAMPLE_DATA / "chat.jsonl"], output=tmp_path / "lora", peft=method_config("lora"), max_steps=3, learning_rate=1e-2)
        FineTuneJob(config, remote, tokenizer).run(progress=False)
        assert all(any(op.startswith("model.layers.") for op, _ in shard.stats.per_op()) for shard in shards)
        shards[0].stats.reset()

        registry = ModelRegistry(remote, tokenizer, base_name="base", embeddings="executor")
        registry.load_adapter("lora", tmp_path / "lora")
        http = HttpServer(create_app(registry), port=0).start()
        try:
            client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0)
            answer = client.chat.completions.create(model="lora", messages=QUESTION, max_tokens=6, temperature=0).choices[0].message.content
            assert "model.embed_tokens" in {op for op, _ in shards[0].stats.per_op()}
        finally:
            http.stop()
            registry.close()
    finally:
        for server in servers:
            server.stop(1.0)
    prompt = tokenizer(tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    expected = greedy_reference(monolithic(chat_model_dir, tmp_path / "lora"), prompt, 6, {2, 4})
    assert answer == tokenizer.decode([t for t in expected if t not in (2, 4)], skip_special_tokens=True)
