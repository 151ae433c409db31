"""Continuous batching: requests that join and leave a running batch get exactly the token ids (and
so the text) of a from-scratch greedy decode of the monolithic PEFT model, for every PEFT family."""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoTokenizer

from symbiosis import BaseExecutor, load_model
from symbiosis.serving import Engine, Event, GenerationRequest, SamplingParams
from symbiosis.serving.engine import EngineClosed
from symbiosis.tiny import save_tiny_model_with_tokenizer

from .adapters import ADAPTER_CONFIGS, greedy_reference, monolithic, save_adapter

PROMPTS = [[1, 50, 60, 70, 80, 90], [1, 33, 44], [1, 100, 101, 102, 103, 104, 105, 106, 107], [1, 7]]
MAX_TOKENS = [9, 3, 12, 6]


class Collector:
    """Events of several requests, gathered from the engine thread."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.first_token = threading.Event()
        self.texts: dict[int, str] = defaultdict(str)

    def emit(self, event: Event) -> None:
        self.events.put(event)
        self.first_token.set()

    def finished(self, count: int) -> dict[int, Event]:
        """The last event of each of ``count`` choices (their texts accumulate in ``texts``)."""
        done: dict[int, Event] = {}
        while len(done) < count:
            event = self.events.get(timeout=60)
            assert event.error is None, event.error
            self.texts[event.choice] += event.text
            if event.finish_reason:
                done[event.choice] = event
        return done


def decode_staggered(engine: Engine, prompts: list[list[int]], max_tokens: list[int]) -> tuple[Collector, dict[int, Event]]:
    """Submit each prompt once the previous one has produced text, so each joins a running batch."""
    collector = Collector()
    for choice, (prompt, budget) in enumerate(zip(prompts, max_tokens)):
        engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=budget, temperature=0), collector.emit, first_choice=choice))
        collector.first_token.wait(timeout=60)
        collector.first_token.clear()
    return collector, collector.finished(len(prompts))


def assert_reference_texts(collector: Collector, done: dict[int, Event], model_dir: Path, adapter: Path | None, tokenizer) -> None:
    reference = monolithic(model_dir, adapter)
    for choice, (prompt, max_tokens) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        expected = greedy_reference(reference, prompt, max_tokens, eos_ids=set())
        assert done[choice].token_ids == tuple(expected), f"choice {choice}"
        assert done[choice].tokens == max_tokens and done[choice].finish_reason == "length"
        assert collector.texts[choice] == tokenizer.decode(expected, skip_special_tokens=True), f"choice {choice}"


@pytest.mark.parametrize("method", [None, *ADAPTER_CONFIGS])
def test_requests_joining_a_running_batch_get_the_reference_tokens(chat_model_dir, tmp_path, method):
    adapter = save_adapter(chat_model_dir, ADAPTER_CONFIGS[method], tmp_path / method, seed=3) if method else None
    client = load_model(BaseExecutor.from_pretrained(chat_model_dir))
    model = PeftModel.from_pretrained(client, adapter) if adapter else client
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    engine = Engine("m", model, tokenizer, eos_ids=[], max_rows=8)
    collector, done = decode_staggered(engine, PROMPTS, MAX_TOKENS)
    engine.close()
    assert engine.join(timeout=30)
    assert_reference_texts(collector, done, chat_model_dir, adapter, tokenizer)
    assert engine.stats.requests == len(PROMPTS)
    assert engine.stats.joined_running_batch >= 1
    assert engine.stats.max_rows >= 2


@pytest.mark.parametrize(("model_type", "overrides"), [("gpt2", {}), ("qwen2", {}), ("mistral", {"sliding_window": 24}), ("gemma2", {})])
def test_other_architectures_and_sliding_windows(tmp_path, model_type, overrides):
    """GPT-2 (Conv1D, learned positions), Qwen2 (biases), Mistral and Gemma 2 (sliding-window layers)."""
    model_dir = save_tiny_model_with_tokenizer(tmp_path / model_type, model_type, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine("m", load_model(BaseExecutor.from_pretrained(model_dir)), tokenizer, eos_ids=[], max_rows=8)
    collector, done = decode_staggered(engine, PROMPTS, MAX_TOKENS)
    assert_reference_texts(collector, done, model_dir, None, tokenizer)
    if overrides:
        assert engine.max_sequence == 23
        errors = Collector()
        engine.submit(GenerationRequest(PROMPTS[2], SamplingParams(max_tokens=20), errors.emit))
        assert "exceed this model's 23 (sliding window)" in str(errors.events.get(timeout=60).error)
    engine.close()


def test_cancelled_rows_leave_the_batch_and_closing_drains_what_was_queued(chat_model_dir):
    model = load_model(BaseExecutor.from_pretrained(chat_model_dir))
    engine = Engine("base", model, AutoTokenizer.from_pretrained(chat_model_dir), eos_ids=[], max_rows=4)
    collector = Collector()
    endless = GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=400, temperature=0), collector.emit, first_choice=0)
    engine.submit(endless)
    collector.first_token.wait(timeout=60)
    short = GenerationRequest(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, n=2), collector.emit, first_choice=1)
    engine.submit(short)
    endless.cancel()
    queued = GenerationRequest(PROMPTS[2], SamplingParams(max_tokens=4, temperature=0), collector.emit, first_choice=3)
    engine.submit(queued)
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest(PROMPTS[3], SamplingParams(max_tokens=1), collector.emit))
    done = collector.finished(3)
    assert sorted(done) == [1, 2, 3] and all(e.finish_reason == "length" for e in done.values())
    assert engine.join(timeout=30) and engine.load() == 0
    assert collector.events.empty()  # the cancelled request never finished
    assert engine.stats.tokens < 400 and engine.stats.cancelled_rows == 1


def test_failures_end_the_affected_requests_and_the_engine_keeps_answering(chat_model_dir):
    executor = BaseExecutor.from_pretrained(chat_model_dir)
    engine = Engine("base", load_model(executor), AutoTokenizer.from_pretrained(chat_model_dir), eos_ids=[], max_rows=4)
    bad_prompt = Collector()
    engine.submit(GenerationRequest([1, 10_000], SamplingParams(max_tokens=3), bad_prompt.emit))  # id beyond the vocabulary
    assert bad_prompt.events.get(timeout=60).error is not None
    running = Collector()
    engine.submit(GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=400, temperature=0), running.emit))
    running.first_token.wait(timeout=60)
    executor.close()  # every later op request fails
    while (event := running.events.get(timeout=60)).error is None:
        assert event.finish_reason is None
    late = Collector()
    engine.submit(GenerationRequest(PROMPTS[1], SamplingParams(max_tokens=3), late.emit))
    assert "closed" in str(late.events.get(timeout=60).error)
    engine.close()
    assert engine.join(timeout=30)
