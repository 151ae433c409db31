"""The serving engine: one forward per step over every sequence, whatever its adapter and PEFT method.

Answers are checked against the monolithic transformers + PEFT model (greedy tokens and
log-probabilities recomputed from scratch), and against themselves run alone: a request's answer
must not depend on its neighbours. Bound on log-probabilities: ``LOGPROB_BOUND`` (absolute, float32).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from symbiosis import BaseExecutor, load_model
from symbiosis.protocol import Direction
from symbiosis.serving import Engine, Event, GenerationRequest, SamplingParams, read_adapter
from symbiosis.serving.adapters import store
from symbiosis.tiny import save_tiny_model_with_tokenizer

from .adapters import ADAPTER_CONFIGS, greedy_with_logprobs, logits_from_scratch, monolithic, save_adapter, save_adapters

#: Largest difference of a log-probability between the engine and the monolithic model, or between
#: a request run alone and beside others (measured: below 3e-6 on these models).
LOGPROB_BOUND = 1e-4
PROMPTS = [[1, 50, 60, 70, 80, 90], [1, 33, 44], [1, 100, 101, 102, 103, 104, 105, 106, 107], [1, 7]]
METHODS = [None, *ADAPTER_CONFIGS]


def generate(engine: Engine, specs: list[tuple], *, stream: bool = False) -> list[Event]:
    """Submit ``(adapter info, prompt, params)`` requests together; each one's final event, in order."""
    events: queue.Queue[Event] = queue.Queue()
    requests = [GenerationRequest(prompt, params, events.put, adapter=info, first_choice=i, stream=stream) for i, (info, prompt, params) in enumerate(specs)]
    engine.submit(*requests)
    done: dict[int, Event] = {}
    while len(done) < len(requests):
        event = events.get(timeout=120)
        assert event.error is None, event.error
        if event.finish_reason:
            done[event.choice] = event
    return [done[i] for i in range(len(requests))]


def greedy(max_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


@pytest.fixture(scope="module")
def setup(chat_model_dir, tmp_path_factory):
    paths = save_adapters(chat_model_dir, tmp_path_factory.mktemp("adapters"))
    executor = BaseExecutor.from_pretrained(chat_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    engine = Engine(load_model(executor), tokenizer, eos_ids=[], max_seqs=64, max_step_tokens=512)
    infos = {name: read_adapter(name, path) for name, path in paths.items()}
    for info in infos.values():
        engine.adapters.register(info)
        engine.adapters.offer(engine.adapters.load(info))  # resident from the first step
    references: dict = {}

    def reference(method: str | None) -> torch.nn.Module:
        if method not in references:
            references[method] = monolithic(chat_model_dir, paths.get(method))
        return references[method]

    yield SimpleNamespace(engine=engine, executor=executor, tokenizer=tokenizer, infos=infos, paths=paths, reference=reference, model_dir=chat_model_dir)
    engine.close()
    assert engine.join(timeout=30)


def assert_matches_reference(event: Event, model: torch.nn.Module, prompt: list[int], max_tokens: int, what: str) -> None:
    tokens, rows = greedy_with_logprobs(model, prompt, max_tokens)
    assert list(event.token_ids) == tokens, what
    for entry, row in zip(event.logprobs, rows if event.logprobs else [], strict=True):
        assert abs(entry.logprob - row[entry.token].item()) <= LOGPROB_BOUND, what
        assert [t for t, _ in entry.top] == row.topk(len(entry.top)).indices.tolist(), what


def test_every_method_and_the_base_in_one_forward_equal_the_monolithic_model(setup):
    engine, executor = setup.engine, setup.executor
    specs = [(setup.infos.get(m), prompt, greedy(6, logprobs=2, prompt_logprobs=1)) for m in METHODS for prompt in PROMPTS[:2]]
    executor.stats.reset()
    steps_before = engine.stats.steps
    events = generate(engine, specs)
    steps = engine.stats.steps - steps_before
    assert engine.stats.max_adapters_in_step == len(METHODS)  # every method (and the base) in one step
    for (info, prompt, _), event in zip(specs, events, strict=True):
        method = info.name if info else None
        model = setup.reference(method)
        assert_matches_reference(event, model, prompt, 6, f"{method} {prompt}")
        expected = torch.log_softmax(logits_from_scratch(model, prompt).float(), dim=-1)
        assert event.prompt_logprobs[0] is None and len(event.prompt_logprobs) == len(prompt)
        for i, entry in enumerate(event.prompt_logprobs[1:], start=1):
            assert entry.token == prompt[i] and abs(entry.logprob - expected[i - 1, prompt[i]].item()) <= LOGPROB_BOUND
    # the executor saw one request per op per step, carrying every sequence's rows
    for (op, direction), stats in executor.stats.per_op().items():
        assert direction is Direction.FORWARD
        if op != "lm_head":
            assert stats.gemms == stats.requests == steps, op


@pytest.mark.parametrize("method", METHODS)
def test_an_answer_does_not_depend_on_its_neighbours(setup, method):
    info, params = setup.infos.get(method), greedy(8, logprobs=3)
    alone = generate(setup.engine, [(info, PROMPTS[2], params)])[0]
    same = generate(setup.engine, [(info, PROMPTS[2], params)] + [(info, p, params) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])])[0]
    others = [(setup.infos.get(m), PROMPTS[i % 4], params) for i, m in enumerate(METHODS) if m != method]
    mixed = generate(setup.engine, [(info, PROMPTS[2], params)] + others)[0]
    for beside in (same, mixed):
        assert beside.token_ids == alone.token_ids
        for a, b in zip(alone.logprobs, beside.logprobs, strict=True):
            assert a.token == b.token and abs(a.logprob - b.logprob) <= LOGPROB_BOUND
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) <= LOGPROB_BOUND


def test_choices_of_one_prompt_share_its_cache_and_sample_with_their_own_seeds(setup):
    info = setup.infos["lora"]
    sampled = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=5)
    events: queue.Queue[Event] = queue.Queue()
    setup.engine.submit(GenerationRequest(PROMPTS[2], sampled, events.put, adapter=info))
    together = {}
    while len(together) < 3:
        event = events.get(timeout=60)
        together[event.choice] = event.token_ids
    # three one-choice requests as choices 0, 1, 2 of one call: seeds 5, 6, 7 as well
    apart = generate(setup.engine, [(info, PROMPTS[2], SamplingParams(max_tokens=10, temperature=1.0, seed=5))] * 3)
    assert [together[i] for i in range(3)] == [e.token_ids for e in apart]
    assert len(set(together.values())) > 1


def test_long_prompts_are_prefilled_in_chunks_while_other_sequences_decode(chat_model_dir):
    engine = Engine(load_model(BaseExecutor.from_pretrained(chat_model_dir)), AutoTokenizer.from_pretrained(chat_model_dir), eos_ids=[], max_step_tokens=16)
    long_prompt = [1] + [(7 * i) % 400 + 20 for i in range(119)]
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(
        GenerationRequest(PROMPTS[3], greedy(20, logprobs=1), events.put, first_choice=0, stream=True),
        GenerationRequest(long_prompt, greedy(4, logprobs=1), events.put, first_choice=1, stream=True),
    )
    order, results, finished = [], {0: [], 1: []}, 0
    while finished < 2:
        event = events.get(timeout=60)
        assert event.error is None, event.error
        order.append(event.choice)
        results[event.choice].append(event)
        finished += event.finish_reason is not None
    # 16 rows per step: the long prompt's 120 tokens take 9 steps, and the short sequence decodes at each
    assert order.index(1) >= 8
    engine.close()
    assert engine.join(timeout=30)
    reference = monolithic(chat_model_dir, None)
    for choice, prompt, max_tokens in ((0, PROMPTS[3], 20), (1, long_prompt, 4)):
        merged = Event(choice, token_ids=tuple(t for e in results[choice] for t in e.token_ids), logprobs=tuple(lp for e in results[choice] for lp in e.logprobs))
        assert_matches_reference(merged, reference, prompt, max_tokens, f"choice {choice}")


def test_a_full_kv_cache_preempts_and_recomputes_and_load_beyond_capacity_queues(chat_model_dir):
    executor = BaseExecutor.from_pretrained(chat_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    # 512 bytes per token (2 layers x keys and values x 2 heads x 16 x float32); 10 blocks of 4: 36 usable slots
    engine = Engine(load_model(executor), tokenizer, eos_ids=[], max_seqs=3, kv_cache_bytes=10 * 4 * 512, block_size=4)
    assert engine.cache.capacity_tokens == 36
    with pytest.raises(ValueError, match="36 tokens per sequence"):
        engine.submit(GenerationRequest(PROMPTS[2], greedy(30), lambda e: None))
    specs = [(None, prompt, greedy(14)) for prompt in PROMPTS + PROMPTS]
    events = generate(engine, specs)
    assert engine.stats.preemptions > 0 and engine.stats.max_seqs <= 3
    reference = monolithic(chat_model_dir, None)
    for (_, prompt, _), event in zip(specs, events, strict=True):
        assert_matches_reference(event, reference, prompt, 14, str(prompt))
    assert engine.cache.pool.free == engine.cache.pool.capacity  # every block came back
    engine.close()
    assert engine.join(timeout=30)
