"""The serving engine: one forward per step over every sequence, whatever its adapter and PEFT method.

Answers are checked against the monolithic transformers + PEFT model (greedy tokens and
log-probabilities recomputed from scratch), and against themselves run alone: a request's answer
must not depend on its neighbours. Bound on log-probabilities: ``LOGPROB_BOUND`` (absolute, float32).
"""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from transformers import AutoTokenizer

from symbiosis import BaseExecutor, load_model
from symbiosis.protocol import Direction
from symbiosis.serving import Engine, EngineClosed, Event, GenerationRequest, SamplingParams, read_adapter
from symbiosis.serving.adapters import store
from symbiosis.serving.kv import BlockPool
from symbiosis.tiny import save_tiny_model_with_tokenizer

from .adapters import ADAPTER_CONFIGS, greedy_with_logprobs, logits_from_scratch, monolithic, save_adapter, save_adapters

#: Largest difference of a log-probability between the engine and the monolithic model, or between
#: a request run alone and beside others (measured: below 3e-6 on these models).
LOGPROB_BOUND = 1e-4
PROMPTS = [[1, 50, 60, 70, 80, 90], [1, 33, 44], [1, 100, 101, 102, 103, 104, 105, 106, 107], [1, 7]]
METHODS = [None, *ADAPTER_CONFIGS]
LORA_GPT2 = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)


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
    executor = BaseExecutor.from_pretrained(chat_model_dir, pack_weights=True)  # as serve-openai runs it
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


def test_prompts_that_start_alike_reuse_the_cached_blocks_of_their_start(setup):
    """Prefix caching: a prompt whose first full blocks were computed before (same tokens, same adapter)
    takes those blocks and computes only the rest, and answers exactly as computed from scratch; another
    adapter's prompt, or one whose prompt log-probabilities are asked for, computes everything."""
    engine, size = setup.engine, setup.engine.cache.block_size
    start = [1] + list(range(200, 200 + 2 * size + 7))  # two full blocks and 8 positions more
    first, second = start + [11, 12], start + [13]
    lora = setup.infos["lora"]

    def run(info, prompt, params):
        before = engine.stats.snapshot()
        [event] = generate(engine, [(info, prompt, params)])
        after = engine.stats.snapshot()
        return event, after["cached_tokens"] - before["cached_tokens"], after["prefill_rows"] - before["prefill_rows"]

    event, cached, _ = run(None, first, greedy(4, logprobs=1))
    assert cached == 0
    assert_matches_reference(event, setup.reference(None), first, 4, "first")
    event, cached, prefilled = run(None, second, greedy(4, logprobs=1))
    assert cached == 2 * size and prefilled == len(second) - 2 * size
    assert_matches_reference(event, setup.reference(None), second, 4, "second, from the cache")
    event, cached, _ = run(lora, second, greedy(4, logprobs=1))  # another adapter: other keys and values
    assert cached == 0
    assert_matches_reference(event, setup.reference("lora"), second, 4, "lora")
    event, cached, _ = run(None, second, greedy(1, prompt_logprobs=1))  # every prompt position's logits needed
    assert cached == 0 and len(event.prompt_logprobs) == len(second)
    event, cached, _ = run(lora, first, greedy(4, logprobs=1))
    assert cached == 2 * size
    assert_matches_reference(event, setup.reference("lora"), first, 4, "lora, from the cache")


def test_cached_blocks_are_reused_least_recently_used_first_and_only_when_nothing_else_is_free():
    pool = BlockPool(5)  # blocks 1..4
    a, b = pool.allocate(2)
    assert pool.register(a, "A") == 1 and pool.register(b, "B") == 2
    assert pool.register(b, "B") == 2 and pool.lookup("A") == (a, 1)
    pool.release([a, b])
    assert pool.free == 4 and pool.cached == 2  # cached blocks count as free
    c, d = pool.allocate(2)  # the two never-registered blocks come first
    assert {c, d}.isdisjoint({a, b}) and pool.cached == 2
    pool.share([b])  # taken from the cache by a sequence that reuses it
    assert pool.cached == 1 and pool.free == 1
    [e] = pool.allocate(1)  # only a cached block is left: it loses its content
    assert e == a and pool.lookup("A") is None and pool.lookup("B") == (b, 2)
    assert pool.allocate(1) is None
    pool.release([b, c, d, e])
    assert pool.free == 4 and pool.cached == 1 and pool.register(e, "A") == 3  # new content, new serial


def test_prefix_caching_can_be_turned_off(chat_model_dir):
    engine = Engine(load_model(BaseExecutor.from_pretrained(chat_model_dir)), None, eos_ids=[], prefix_caching=False)
    prompt = [1] + list(range(300, 340))
    events = [generate(engine, [(None, prompt, greedy(3))])[0] for _ in range(2)]
    engine.close()
    assert engine.join(timeout=30)
    assert engine.stats.cached_tokens == 0 and events[0].token_ids == events[1].token_ids


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


def test_adapters_beyond_the_resident_bound_are_loaded_on_demand_and_evicted_least_recently_used(setup, monkeypatch):
    engine = Engine(load_model(setup.executor), setup.tokenizer, eos_ids=[], max_adapters=2)
    names = ["lora", "ia3", "prefix", "prompt"]
    for name in names:
        engine.adapters.register(read_adapter(name, setup.paths[name]))
    specs = [(engine.adapters.get(name), prompt, greedy(5)) for name in names for prompt in PROMPTS[:2]]
    events = generate(engine, specs)
    for (info, prompt, _), event in zip(specs, events, strict=True):
        assert_matches_reference(event, setup.reference(info.name), prompt, 5, info.name)
    assert engine.adapters.loads >= 4 and engine.adapters.evictions >= 2 and len(engine.adapters.resident()) <= 2

    # loading never stalls running sequences: while an adapter's load is held, the base keeps decoding
    release = threading.Event()
    original = store.load_adapter
    monkeypatch.setattr(store, "load_adapter", lambda model, info: release.wait(60) and original(model, info))
    events: queue.Queue[Event] = queue.Queue()
    unloaded = next(n for n in names if n not in engine.adapters.resident())
    engine.submit(
        GenerationRequest(PROMPTS[0], greedy(30), events.put, first_choice=0),
        GenerationRequest(PROMPTS[1], greedy(5), events.put, adapter=engine.adapters.get(unloaded), first_choice=1),
    )
    first = events.get(timeout=60)
    assert first.choice == 0 and first.finish_reason == "length" and len(first.token_ids) == 30
    release.set()
    second = events.get(timeout=60)
    assert second.choice == 1 and second.error is None
    assert_matches_reference(second, setup.reference(unloaded), PROMPTS[1], 5, unloaded)
    engine.close()
    assert engine.join(timeout=30)


def test_cancelled_sequences_leave_at_the_next_step_and_closing_drains_the_queue(setup):
    engine = Engine(load_model(setup.executor), setup.tokenizer, eos_ids=[], max_seqs=4)
    events: queue.Queue[Event] = queue.Queue()
    endless = GenerationRequest(PROMPTS[0], greedy(400), events.put, first_choice=0, stream=True)
    engine.submit(endless)
    assert events.get(timeout=60).choice == 0  # it runs
    short = GenerationRequest(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, n=2), events.put, first_choice=1)
    engine.submit(short)
    endless.cancel()
    queued = GenerationRequest(PROMPTS[2], greedy(4), events.put, first_choice=3)
    engine.submit(queued)
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest(PROMPTS[3], greedy(1), events.put))
    assert engine.join(timeout=30)
    finished = []
    while not events.empty():
        event = events.get()
        if event.finish_reason:
            finished.append(event.choice)
    assert sorted(finished) == [1, 2, 3]  # the cancelled request never finished
    assert engine.stats.cancelled == 1 and engine.stats.tokens < 400 and engine.load() == 0
    assert engine.cache.pool.free == engine.cache.pool.capacity


def test_bad_requests_are_refused_and_a_failing_step_fails_only_its_sequences(chat_model_dir):
    executor = BaseExecutor.from_pretrained(chat_model_dir)
    engine = Engine(load_model(executor), AutoTokenizer.from_pretrained(chat_model_dir), eos_ids=[], max_seqs=4)
    with pytest.raises(ValueError, match="token ids must lie in"):
        engine.submit(GenerationRequest([1, 10_000], greedy(3), lambda e: None))
    with pytest.raises(ValueError, match="exceed this server's 512 tokens"):
        engine.submit(GenerationRequest(PROMPTS[0], greedy(510), lambda e: None))
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(GenerationRequest(PROMPTS[0], greedy(400), events.put, stream=True))
    assert events.get(timeout=60).error is None
    executor.close()  # every later op request fails
    while (event := events.get(timeout=60)).error is None:
        assert event.finish_reason is None
    engine.submit(GenerationRequest(PROMPTS[1], greedy(3), events.put))
    assert "closed" in str(events.get(timeout=60).error)
    engine.close()
    assert engine.join(timeout=30)
    assert engine.cache.pool.free == engine.cache.pool.capacity


#: Per architecture: config overrides and the LoRA adapter served beside the base.
ARCHITECTURES = {
    "gpt2": ({}, LORA_GPT2),  # Conv1D, learned positions
    "qwen2": ({}, ADAPTER_CONFIGS["lora"]),  # biases
    "mistral": ({"sliding_window": 8}, ADAPTER_CONFIGS["lora"]),  # windows shorter than the sequences
    "gemma2": ({"sliding_window": 8}, ADAPTER_CONFIGS["lora"]),  # soft-capped attention and logits
    "opt": ({}, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "fc1", "fc2"])),  # MLP on [tokens, hidden]
    "qwen2_moe": ({}, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj", "down_proj", "shared_expert_gate"])),
    "gpt_oss": ({"sliding_window": 8}, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])),  # sinks
    "llama4_text": (  # chunked attention in chunks of 4 positions, no rotary embedding in the full-attention layer
        dict(attention_chunk_size=4, layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0]),
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    ),
    # PEFT's all-linear here also targets the experts' and the router's parameters (target_parameters)
    "mixtral": ({}, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")),
    "deepseek_v3": (  # multi-head latent attention: keys 24 wide, values 12
        dict(qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=12, kv_lora_rank=24, q_lora_rank=40, num_key_value_heads=4,
             n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=32, n_group=1, topk_group=1),
        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_b_proj", "kv_b_proj", "o_proj"]),
    ),
}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_other_architectures_sliding_windows_soft_capping_and_sinks(tmp_path, model_type):
    """Each architecture's quirk (see ``ARCHITECTURES``: Qwen2-MoE's shared expert also sees its tokens
    flattened, GPT-OSS adds attention sinks, Llama 4 chunked attention, Mixtral's adapter targets expert
    and router parameters, DeepSeek V3 has values narrower than keys; the last five have mixture-of-experts
    layers), with a LoRA adapter beside the base."""
    overrides, lora = ARCHITECTURES[model_type]
    model_dir = save_tiny_model_with_tokenizer(tmp_path / model_type, model_type, **overrides)
    adapter = save_adapter(model_dir, lora, tmp_path / "lora", seed=1)
    engine = Engine(load_model(BaseExecutor.from_pretrained(model_dir)), AutoTokenizer.from_pretrained(model_dir), eos_ids=[], max_step_tokens=8)
    info = read_adapter("lora", adapter)
    engine.adapters.register(info)
    long_prompt = [1] + [(5 * i) % 300 + 10 for i in range(13)]
    specs = [(None, long_prompt, greedy(6, logprobs=1)), (info, long_prompt, greedy(6, logprobs=1)), (info, PROMPTS[0], greedy(6, logprobs=1))]
    events = generate(engine, specs)
    engine.close()
    assert engine.join(timeout=30)
    for (spec_info, prompt, _), event in zip(specs, events, strict=True):
        assert_matches_reference(event, monolithic(model_dir, adapter if spec_info else None), prompt, 6, f"{model_type} {spec_info}")


def test_adapters_on_expert_parameters_share_steps_with_other_adapters(tmp_path):
    """Two adapters on a mixture-of-experts model's expert and router parameters, and the bare base, in the
    same steps: each request's answer is its own monolithic PEFT model's."""
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "mixtral", "mixtral")
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"])
    paths = {name: save_adapter(model_dir, config, tmp_path / name, seed=seed) for seed, name in enumerate(["a", "b"], start=1)}
    engine = Engine(load_model(BaseExecutor.from_pretrained(model_dir)), AutoTokenizer.from_pretrained(model_dir), eos_ids=[])
    infos = {name: read_adapter(name, path) for name, path in paths.items()}
    for info in infos.values():
        engine.adapters.register(info)
        engine.adapters.offer(engine.adapters.load(info))
    specs = [(infos["a"], PROMPTS[0], greedy(5, logprobs=1)), (None, PROMPTS[2], greedy(5, logprobs=1)), (infos["b"], PROMPTS[1], greedy(5, logprobs=1))]
    events = generate(engine, specs)
    engine.close()
    assert engine.join(timeout=30)
    assert engine.stats.max_adapters_in_step == 3
    for (info, prompt, _), event in zip(specs, events, strict=True):
        assert_matches_reference(event, monolithic(model_dir, paths[info.name] if info else None), prompt, 5, f"{info.name if info else None}")


def test_an_adapter_that_cannot_be_attached_fails_its_requests_only(setup, monkeypatch):
    """Attaching runs on the engine's thread when a request first needs the adapter: a failure there
    is that adapter's requests' error, and the engine goes on serving everyone else."""
    engine = setup.engine
    broken = read_adapter("broken", setup.paths["lora"])
    engine.adapters.register(broken)
    attach = engine.adapters._attach

    def refuse(loaded):
        if loaded.info is broken:
            raise RuntimeError("this layer cannot be dispatched")
        attach(loaded)

    monkeypatch.setattr(engine.adapters, "_attach", refuse)
    events: queue.Queue[Event] = queue.Queue()
    try:
        engine.submit(GenerationRequest(PROMPTS[0], greedy(4), events.put, adapter=broken))
        error = events.get(timeout=60).error
        assert "'broken' cannot be served" in str(error) and "cannot be dispatched" in str(error)
        [event] = generate(engine, [(None, PROMPTS[1], greedy(4))])
        assert len(event.token_ids) == 4
    finally:
        engine.adapters.unregister("broken")


def test_an_engine_failure_fails_every_request_and_refuses_new_ones(chat_model_dir, monkeypatch):
    """An error outside any step (a bug in the engine itself) ends the engine's loop: every queued request
    gets it as its error (none is left waiting) and new requests are refused, naming it."""
    engine = Engine(load_model(BaseExecutor.from_pretrained(chat_model_dir)), None, eos_ids=[])
    started = threading.Event()

    def broken_schedule(ready):
        started.wait(timeout=60)
        raise RuntimeError("scheduler bug")

    monkeypatch.setattr(engine.scheduler, "schedule", broken_schedule)
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(*(GenerationRequest(prompt, greedy(4), events.put, first_choice=i) for i, prompt in enumerate(PROMPTS)))
    started.set()
    errors = {}
    while len(errors) < len(PROMPTS):
        event = events.get(timeout=60)
        errors[event.choice] = event.error
    assert all("scheduler bug" in str(error) for error in errors.values())
    assert engine.join(timeout=30)
    with pytest.raises(EngineClosed, match="internal error: scheduler bug"):
        engine.submit(GenerationRequest(PROMPTS[0], greedy(1), events.put))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_engine_on_cuda_equals_the_monolithic_model(chat_model_dir, tmp_path):
    paths = save_adapters(chat_model_dir, tmp_path, ["lora", "ia3", "oft", "prefix", "prompt"])
    client = load_model(BaseExecutor.from_pretrained(chat_model_dir, device="cuda"), device="cuda")
    engine = Engine(client, AutoTokenizer.from_pretrained(chat_model_dir), eos_ids=[])
    infos = {name: read_adapter(name, path) for name, path in paths.items()}
    for info in infos.values():
        engine.adapters.register(info)
    specs = [(info, prompt, greedy(6, logprobs=1)) for info in (None, *infos.values()) for prompt in PROMPTS[:2]]
    events = generate(engine, specs)
    engine.close()
    assert engine.join(timeout=30) and engine.cache.keys[0].device.type == "cuda"
    for (info, prompt, _), event in zip(specs, events, strict=True):
        assert_matches_reference(event, monolithic(chat_model_dir, info.path if info else None), prompt, 6, str(info))
