"""lm-evaluation-harness through the server: its ``local-completions`` backend scores every choice of a
multiple-choice task by sending the context and the choice as token ids with ``echo``, ``logprobs`` and
``max_tokens`` 1. The log-likelihoods it gets must be those of the monolithic transformers + PEFT model.

The task (``lm_eval_tasks/``) is a YAML over a JSONL file in this repository; nothing is downloaded
(``HF_DATASETS_OFFLINE=1``) and the tokenizer is the local model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from symbiosis import BaseExecutor
from symbiosis.executor_ref import ExecutorRef
from symbiosis.serving import HttpServer, ModelRegistry, create_app

from .adapters import logits_from_scratch, monolithic, save_adapters

TASKS = Path(__file__).with_name("lm_eval_tasks")


def reference_loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of the continuation's token log-probabilities, and whether each token is the argmax,
    for the token ids lm-evaluation-harness builds (trailing spaces move to the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    logprobs = torch.log_softmax(logits_from_scratch(model, whole).float(), dim=-1)
    rows = logprobs[start - 1 : len(whole) - 1]
    targets = torch.tensor(whole[start:])
    return rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


@pytest.mark.parametrize("model", ["lora", "prefix"])
def test_lm_eval_loglikelihoods_through_the_server_equal_the_monolithic_model(chat_model_dir, tmp_path, monkeypatch, model):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    adapter = save_adapters(chat_model_dir, tmp_path, [model])[model]
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    registry = ModelRegistry(ExecutorRef(BaseExecutor.from_pretrained(chat_model_dir)), tokenizer, base_name="base")
    registry.load_adapter(model, adapter)
    server = HttpServer(create_app(registry), port=0).start()
    try:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": model, "base_url": f"{server.url}/v1/completions", "tokenizer": str(chat_model_dir),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 4, "max_retries": 1},
            tasks=["symbiosis_tiny_mc"],
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            log_samples=True,
        )
    finally:
        server.stop()
        registry.close()
    reference = monolithic(chat_model_dir, adapter)
    samples = results["samples"]["symbiosis_tiny_mc"]
    assert len(samples) == 6 and "acc,none" in results["results"]["symbiosis_tiny_mc"]
    scored = 0
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            loglikelihood, greedy = response[0]
            expected, expected_greedy = reference_loglikelihood(reference, tokenizer, context, continuation)
            assert abs(loglikelihood - expected) <= 1e-3 and greedy == expected_greedy, (context, continuation)
            scored += 1
    assert scored == 18  # every choice of every question
