"""The OpenAI-compatible server, driven by the official ``openai`` client against uvicorn on loopback.

Answers are checked against the monolithic transformers + PEFT model (greedy decoding recomputed
from scratch), so they prove the whole path: HTTP, chat template, continuous batching, split
execution and every PEFT family.
"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from symbiosis import BaseExecutor
from symbiosis.executor_ref import ExecutorRef
from symbiosis.serving import HttpServer, ModelRegistry, create_app

from .adapters import greedy_reference, greedy_with_logprobs, logits_from_scratch, monolithic, save_adapters

BASE = "tiny-base"
ADMIN = {"Authorization": "Bearer admin-secret"}
EOS = {2, 4}  # <|eos|> and <|im_end|> (the tiny model's generation config)
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def served(chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    adapters = save_adapters(chat_model_dir, root, ["lora", "ia3", "prefix", "prompt"])
    executor = BaseExecutor.from_pretrained(chat_model_dir, max_wait_s=0.002)
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    registry = ModelRegistry(ExecutorRef(executor), tokenizer, base_name=BASE, max_seqs=16)
    for name in ("lora", "ia3", "prefix"):  # "prompt" is loaded at run time by a test
        registry.load_adapter(name, adapters[name])
    server = HttpServer(create_app(registry, admin_token="admin-secret"), port=0).start()
    yield SimpleNamespace(url=server.url, registry=registry, executor=executor, adapters=adapters, model_dir=chat_model_dir, tokenizer=tokenizer)
    server.stop()
    registry.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)


def reference_chat(served, model: str, messages: list[dict], max_tokens: int) -> tuple[str, str, int]:
    """(content, finish_reason, completion tokens) of greedy decoding on the monolithic model."""
    tokenizer = served.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = greedy_reference(monolithic(served.model_dir, served.adapters.get(model)), prompt, max_tokens, EOS)
    finish = "stop" if tokens[-1] in EOS else "length"
    return tokenizer.decode([t for t in tokens if t not in EOS], skip_special_tokens=True), finish, len(tokens)


def test_models_lists_the_base_and_adapters_of_mixed_methods(client):
    assert [m.id for m in client.models.list()] == [BASE, "lora", "ia3", "prefix"]
    card = client.models.retrieve("prefix")
    assert card.model_extra["peft_type"] == "PREFIX_TUNING" and card.model_extra["parent"] == BASE


@pytest.mark.parametrize("model", [BASE, "lora", "ia3", "prefix"])
def test_chat_completion_equals_the_monolithic_peft_model(served, client, model):
    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, temperature=0)
    content, finish, tokens = reference_chat(served, model, QUESTION, 10)
    assert answer.model == model and answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == content
    assert answer.choices[0].finish_reason == finish
    assert answer.usage.completion_tokens == tokens and answer.usage.prompt_tokens > 10


def test_streamed_chat_equals_the_plain_answer(client):
    plain = client.chat.completions.create(model="lora", messages=QUESTION, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(model="lora", messages=QUESTION, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_with_several_prompts_n_choices_and_seeds(client):
    request = dict(model="ia3", prompt=["The river", "Hello there"], n=2, max_tokens=6, temperature=1.0, seed=7)
    first = client.completions.create(**request)
    again = client.completions.create(**request)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # same seed, same samples
    assert first.choices[0].text != first.choices[1].text  # each choice draws its own tokens
    assert all(c.finish_reason == "length" for c in first.choices)
    assert first.usage.completion_tokens == 4 * 6
    other_seed = client.completions.create(**{**request, "seed": 8})
    assert [c.text for c in other_seed.choices] != [c.text for c in first.choices]


def test_chat_with_n_choices(served, client):
    sampled = dict(model="ia3", messages=QUESTION, n=3, max_tokens=6, temperature=1.0, seed=5)
    first, again = client.chat.completions.create(**sampled), client.chat.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # same seed, same samples
    assert len(set(texts)) > 1  # each choice draws its own tokens
    greedy = client.chat.completions.create(model="ia3", messages=QUESTION, n=2, max_tokens=6, temperature=0)
    content, finish, tokens = reference_chat(served, "ia3", QUESTION, 6)
    assert [(c.message.content, c.finish_reason) for c in greedy.choices] == [(content, finish)] * 2
    assert greedy.usage.completion_tokens == 2 * tokens


def test_top_p_keeps_sampling_seeded_and_a_tiny_top_p_is_greedy(client):
    def answer(**options) -> str:
        return client.chat.completions.create(model="lora", messages=QUESTION, max_tokens=8, **options).choices[0].message.content

    greedy = answer(temperature=0)
    assert answer(temperature=1.5, top_p=0.9, seed=11) == answer(temperature=1.5, top_p=0.9, seed=11)
    assert answer(temperature=1.5, top_p=1e-6, seed=11) == greedy  # only the most likely token is left
    assert answer(temperature=1.5, seed=11) != greedy  # without top_p, the same seed samples other tokens


def stop_in_the_middle(text: str) -> str:
    """Two printable characters from the middle of ``text``, to use as a stop sequence."""
    candidates = [text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2]]
    return candidates[len(candidates) // 2]


def test_chat_stop_sequences_end_the_content_before_them(client):
    request = dict(model="lora", messages=QUESTION, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**request).choices[0].message.content
    stop = stop_in_the_middle(full)
    cut = client.chat.completions.create(**request, stop=["never-there", stop])
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (full[: full.find(stop)], "stop")


def test_stop_sequences_end_the_text_before_them_streamed_or_not(client):
    full = client.completions.create(model="prefix", prompt="The river town", max_tokens=16, temperature=0).choices[0].text
    stop = stop_in_the_middle(full)
    expected = full[: full.find(stop)]
    cut = client.completions.create(model="prefix", prompt="The river town", max_tokens=16, temperature=0, stop=[stop, "never-there"])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(model="prefix", prompt="The river town", max_tokens=16, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_an_unknown_adapter_is_a_404_never_the_base(client):
    calls = [
        lambda: client.chat.completions.create(model="no-such-adapter", messages=QUESTION, max_tokens=2),
        lambda: client.chat.completions.create(model="no-such-adapter", messages=QUESTION, max_tokens=2, stream=True),
        lambda: client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2),
        lambda: client.models.retrieve("no-such-adapter"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
        assert "no-such-adapter" in info.value.body["message"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(top_logprobs=2), "top_logprobs requires logprobs"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids"),
        (dict(logit_bias={"99999": 1}), "logit_bias token ids must lie in [0, "),
        (dict(extra_body={"best_of": 2}), "best_of"),
        (dict(temperature=3.0), "temperature"),
        (dict(max_tokens=10_000), "maximum context length is 512 tokens"),
        (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages"),
    ],
)
def test_requests_that_cannot_be_answered_as_asked_are_400(client, options, message):
    request = dict(model="lora", messages=QUESTION, max_tokens=4) | options
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert message in info.value.body["message"]


def test_adapters_are_loaded_and_unloaded_at_run_time(served, client):
    admin = httpx.Client(base_url=served.url, timeout=120)
    prompt_adapter = str(served.adapters["prompt"])
    assert admin.post("/admin/adapters", json={"name": "prompt", "path": prompt_adapter}).status_code == 401
    loaded = admin.post("/admin/adapters", json={"name": "prompt", "path": prompt_adapter}, headers=ADMIN)
    assert loaded.status_code == 201 and loaded.json()["peft_type"] == "PROMPT_TUNING"
    assert "prompt" in [m.id for m in client.models.list()]
    answer = client.chat.completions.create(model="prompt", messages=QUESTION, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == reference_chat(served, "prompt", QUESTION, 8)[0]

    assert admin.post("/admin/adapters", json={"name": "prompt", "path": prompt_adapter}, headers=ADMIN).status_code == 409
    missing = admin.post("/admin/adapters", json={"name": "other", "path": str(served.model_dir)}, headers=ADMIN)
    assert missing.status_code == 400 and "not a PEFT adapter directory" in missing.json()["error"]["message"]

    # unloading lets a running request finish, and refuses new ones at once
    stream = client.chat.completions.create(model="prompt", messages=QUESTION, max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    assert admin.delete("/admin/adapters/prompt", headers=ADMIN).json()["deleted"] is True
    rest = list(stream)
    assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="prompt", messages=QUESTION, max_tokens=2)
    assert admin.delete("/admin/adapters/prompt", headers=ADMIN).status_code == 404
    assert admin.delete(f"/admin/adapters/{BASE}", headers=ADMIN).status_code == 409
    assert [m["id"] for m in admin.get("/admin/adapters", headers=ADMIN).json()["data"]] == ["lora", "ia3", "prefix"]


def test_concurrent_requests_for_different_adapters_share_the_engines_steps(served, client):
    models = [BASE, "lora", "ia3", "prefix"] * 2
    expected = {m: reference_chat(served, m, QUESTION, 16)[0] for m in set(models)}
    before = httpx.get(f"{served.url}/admin/stats", headers=ADMIN).json()
    results: dict[int, str] = {}
    start = threading.Barrier(len(models))

    def ask(i: int, model: str) -> None:
        start.wait()
        results[i] = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(models)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {i: results.get(i) for i in range(len(models))} == {i: expected[m] for i, m in enumerate(models)}
    after = httpx.get(f"{served.url}/admin/stats", headers=ADMIN).json()
    assert after["engine"]["mixed_steps"] > before["engine"]["mixed_steps"]  # several adapters' rows in one forward
    assert after["executor"]["rows_per_gemm"] > 1
    assert all(after["engine"]["per_model"][m]["requests"] >= before["engine"]["per_model"].get(m, {}).get("requests", 0) + 2 for m in set(models))


def test_adapters_beyond_max_adapters_are_answered_by_loading_them_on_demand(served):
    registry = ModelRegistry(ExecutorRef(served.executor), served.tokenizer, base_name=BASE, max_seqs=8, max_adapters=1)
    for name in ("lora", "ia3", "prefix"):
        registry.register_adapter(name, served.adapters[name])  # registered only: nothing loaded yet
    server = HttpServer(create_app(registry), port=0).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        for model in ("lora", "ia3", "prefix", "lora"):
            answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0)
            assert answer.choices[0].message.content == reference_chat(served, model, QUESTION, 6)[0], model
        adapters = registry.engine.adapters
        assert adapters.loads == 4 and adapters.evictions == 3 and len(adapters.resident()) == 1  # least recently used left first
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="not-registered", prompt="hi", max_tokens=2)
    finally:
        server.stop()
        registry.close()


def test_an_api_key_is_required_when_configured(served):
    guarded = HttpServer(create_app(served.registry, api_key="sk-test"), port=0).start()
    try:
        wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sk-test", max_retries=0)
        assert BASE in [m.id for m in right.models.list()]
    finally:
        guarded.stop()


@pytest.mark.parametrize(
    ("host", "admin_token", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", "secret", False), ("127.0.0.1", None, False), ("localhost", None, False)]
)
def test_an_open_admin_api_beyond_loopback_is_warned_about(served, caplog, host, admin_token, warned):
    with caplog.at_level(logging.WARNING, logger="symbiosis.serving.http"):
        server = HttpServer(create_app(served.registry, admin_token=admin_token), host=host, port=0).start()
        server.stop()
    assert ("/admin is open to anyone" in caplog.text) == warned


def test_a_streaming_client_that_disconnects_cancels_its_generation(served):
    engine = served.registry.engine
    admitted_before, cancelled_before = engine.stats.requests, engine.stats.cancelled
    body = {"model": "ia3", "messages": QUESTION, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.url, timeout=120) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        while '"content": ""' in (line := next(lines)) or not line:  # until the model has produced text
            pass
        assert '"content": "' in line
    deadline = time.monotonic() + 60
    while engine.load() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.load() == 0
    assert engine.stats.requests == admitted_before + 1
    assert engine.stats.cancelled == cancelled_before + 1  # its row left the running batch unfinished


def test_a_client_that_disconnects_before_a_whole_answer_cancels_its_generation(served):
    engine = served.registry.engine
    cancelled_before, tokens_before = engine.stats.cancelled, engine.stats.tokens
    body = {"model": "lora", "prompt": "The river town", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=served.url, timeout=httpx.Timeout(120, read=0.3)) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)  # gives up (and closes its connection) long before 480 tokens
    deadline = time.monotonic() + 60
    while engine.stats.cancelled == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.01)
    while engine.load() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.cancelled == cancelled_before + 1 and engine.load() == 0
    assert engine.stats.tokens - tokens_before < 480


@pytest.mark.parametrize("prompt", [[5 + i % 400 for i in range(600)], "word " * 600])
def test_a_prompt_longer_than_the_context_is_a_400_naming_the_limit(client, prompt):
    for options in (dict(max_tokens=1), dict(max_tokens=0, echo=True, logprobs=1)):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="lora", prompt=prompt, **options)
        body = info.value.body
        assert "maximum context length is 512 tokens" in body["message"] and body["code"] == "context_length_exceeded" and body["param"] == "prompt"


def test_echo_with_logprobs_scores_a_token_id_prompt_as_the_monolithic_model_does(served, client):
    prompt = served.tokenizer("The river town woke early")["input_ids"]
    expected = torch.log_softmax(logits_from_scratch(monolithic(served.model_dir, served.adapters["lora"]), prompt).float(), dim=-1)
    scored = client.completions.create(model="lora", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    choice = scored.choices[0]
    assert choice.text == served.tokenizer.decode(prompt, skip_special_tokens=True) and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs.tokens == [served.tokenizer.decode([t]) for t in prompt]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # the first token has none
    for i in range(1, len(prompt)):
        assert abs(logprobs.token_logprobs[i] - expected[i - 1, prompt[i]].item()) <= 1e-4
        alternatives = logprobs.top_logprobs[i]  # two ids that decode to the same text share a key
        assert 1 <= len(alternatives) <= 2 and max(alternatives.values()) == pytest.approx(expected[i - 1].max().item(), abs=1e-4)
    assert logprobs.text_offset[0] == 0 and scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(prompt)
    # one generated token more: its log-probability and alternatives follow the prompt's (as lm-evaluation-harness reads them)
    one = client.completions.create(model="lora", prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0).choices[0].logprobs
    assert len(one.tokens) == len(prompt) + 1 and one.token_logprobs[0] is None
    assert one.token_logprobs[1 : len(prompt)] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-4)
    assert one.token_logprobs[-1] == max(one.top_logprobs[-1].values())  # greedy: the chosen token is the most likely


def test_completion_and_chat_logprobs_of_generated_tokens(served, client):
    tokens, rows = greedy_with_logprobs(monolithic(served.model_dir, served.adapters["ia3"]), served.tokenizer("Hello there")["input_ids"], 6)
    completion = client.completions.create(model="ia3", prompt="Hello there", max_tokens=6, temperature=0, logprobs=3).choices[0].logprobs
    assert completion.tokens == [served.tokenizer.decode([t]) for t in tokens]
    assert completion.token_logprobs == pytest.approx([row[t].item() for t, row in zip(tokens, rows)], abs=1e-4)
    assert all(len(top) <= 3 for top in completion.top_logprobs)

    prompt = served.tokenizer(served.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    tokens, rows = greedy_with_logprobs(monolithic(served.model_dir, served.adapters["prefix"]), prompt, 5)
    chat = client.chat.completions.create(model="prefix", messages=QUESTION, max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert chat.usage.completion_tokens == 5 and [c.token for c in content] == [served.tokenizer.decode([t]) for t in tokens]
    for entry, token, row in zip(content, tokens, rows):
        assert abs(entry.logprob - row[token].item()) <= 1e-4 and entry.bytes == list(entry.token.encode())
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)


def test_penalties_and_logit_bias_change_the_distribution_as_specified(served, client):
    prompt = served.tokenizer("The river town")["input_ids"]
    model = monolithic(served.model_dir, None)

    def reference(presence: float, frequency: float, bias: dict[int, float]) -> list[int]:
        sequence, generated = list(prompt), []
        for _ in range(12):
            logits = logits_from_scratch(model, sequence)[-1].float().clone()
            for token in set(generated):
                logits[token] -= presence + frequency * generated.count(token)
            for token, value in bias.items():
                logits[token] += value
            generated.append(int(logits.argmax()))
            sequence.append(generated[-1])
        return generated

    def served_tokens(**options) -> list[str]:
        answer = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0, logprobs=0, **options)
        return answer.choices[0].logprobs.tokens

    for options, expected in (
        (dict(presence_penalty=1.5), reference(1.5, 0.0, {})),
        (dict(frequency_penalty=1.0), reference(0.0, 1.0, {})),
        (dict(logit_bias={"77": 100}), [77] * 12),
    ):
        assert served_tokens(**options) == [served.tokenizer.decode([t]) for t in expected], options


def test_prometheus_metrics_count_requests_tokens_and_latencies(served):
    registry = ModelRegistry(ExecutorRef(served.executor), served.tokenizer, base_name=BASE, max_seqs=8)
    registry.load_adapter("lora", served.adapters["lora"])
    server = HttpServer(create_app(registry, admin_token="admin-secret"), port=0).start()
    try:
        assert httpx.get(f"{server.url}/metrics").status_code == 401  # behind the admin token, as /admin is
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        chats = [client.chat.completions.create(model="lora", messages=QUESTION, max_tokens=5, temperature=0) for _ in range(2)]
        pair = client.completions.create(model=BASE, prompt="one two three", max_tokens=4, n=2, temperature=1, seed=3)
        streamed = list(client.completions.create(model=BASE, prompt="four five", max_tokens=3, temperature=0, stream=True))
        assert streamed
        answer = httpx.get(f"{server.url}/metrics", headers=ADMIN)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

        def value(name: str, **labels: str) -> float:
            return samples[(f"symbiosis_serving_{name}", tuple(sorted(labels.items())))]

        assert value("requests_total", model="lora") == 2 and value("requests_total", model=BASE) == 2
        assert value("generation_tokens_total", model="lora") == sum(c.usage.completion_tokens for c in chats)
        assert value("generation_tokens_total", model=BASE) == pair.usage.completion_tokens + 3
        assert value("prompt_tokens_total", model="lora") == sum(c.usage.prompt_tokens for c in chats)
        finished = {labels: v for (name, labels), v in samples.items() if name == "symbiosis_serving_request_success_total"}
        assert sum(v for labels, v in finished.items() if ("model", "lora") in labels) == 2
        assert sum(v for labels, v in finished.items() if ("model", BASE) in labels) == 3  # n=2, and the streamed one
        for model, choices in (("lora", 2), (BASE, 3)):
            assert value("e2e_request_latency_seconds_count", model=model) == choices
            assert value("time_to_first_token_seconds_count", model=model) == choices
            assert 0 < value("time_to_first_token_seconds_sum", model=model) <= value("e2e_request_latency_seconds_sum", model=model)
            assert value("e2e_request_latency_seconds_bucket", model=model, le="+Inf") == choices
        assert value("sequences_running") == 0 and value("sequences_waiting") == 0 and value("kv_cache_usage_ratio") == 0
        assert value("adapters_resident") == 1 and value("adapters_registered") == 1
        assert value("steps_total") > 0 and value("decode_rows_total") > 0 and value("preemptions_total") == 0
    finally:
        server.stop()
        registry.close()
