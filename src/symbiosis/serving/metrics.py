"""Prometheus metrics of an OpenAI server (``GET /metrics``), in the text format any scraper reads.

State is read from the engine when scraped (sequences running and waiting, KV cache usage, adapters,
the engine's counters); latencies are observed as each choice finishes (``Engine.on_finish``):
time to first token, time per output token and end-to-end latency from submission, per served
model. The names follow vLLM's where one exists (``docs/serving.md`` lists them side by side).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import Engine, Finished

PREFIX = "symbiosis_serving"
#: Latency buckets in seconds: from a fast decode step on a GPU to a long request on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
#: The engine's counters exported as ``{PREFIX}_{name}_total``: (``EngineStats`` field, help).
ENGINE_COUNTERS = {
    "steps": ("steps", "Engine steps (one forward each)"),
    "prompt_rows": ("prefill_rows", "Prompt token rows computed (recomputed ones after a preemption included)"),
    "decode_rows": ("decode_rows", "Decoding token rows computed"),
    "preemptions": ("preemptions", "Sequences preempted for lack of KV cache blocks (recomputed later)"),
    "prefix_cache_hit_tokens": ("cached_tokens", "Prompt positions whose keys and values came from the prefix cache, not computed"),
    "cancelled": ("cancelled", "Sequences cancelled (client gone) before they finished"),
    "adapter_loads": ("adapter_loads", "Adapters made resident"),
    "adapter_evictions": ("adapter_evictions", "Resident adapters evicted"),
}


class ServingMetrics:
    """The metrics of the server around ``engine``; ``render()`` is the exposition's body."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        labels = ["model"]
        histogram = dict(labelnames=labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Submission to first generated token, per choice", **histogram)
        self.per_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "Mean time between a choice's generated tokens after the first", **histogram
        )
        self.latency = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Submission to last token, per choice", **histogram)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished choices", labels, registry=self.registry)
        self.finished = Counter(
            f"{PREFIX}_request_success", "Choices finished, by reason (stop, length)", ["model", "finished_reason"], registry=self.registry
        )
        self.registry.register(_EngineCollector(engine))
        engine.on_finish(self.observe)

    def observe(self, finished: Finished) -> None:
        model = finished.model
        if finished.first_token_s is not None:
            self.first_token.labels(model).observe(finished.first_token_s)
            if finished.generated_tokens > 1:
                self.per_token.labels(model).observe((finished.total_s - finished.first_token_s) / (finished.generated_tokens - 1))
        self.latency.labels(model).observe(finished.total_s)
        self.prompt_tokens.labels(model).inc(finished.prompt_tokens)
        self.finished.labels(model, finished.reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's state and counters, read at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        running, waiting = engine.occupancy()
        yield GaugeMetricFamily(f"{PREFIX}_sequences_running", "Sequences (choices) in the running batch", value=running)
        yield GaugeMetricFamily(f"{PREFIX}_sequences_waiting", "Requests and sequences queued for admission", value=waiting)
        kv = engine.kv_usage()
        yield GaugeMetricFamily(
            f"{PREFIX}_kv_cache_usage_ratio", "Fraction of the KV cache's blocks in use", value=1 - kv["free_blocks"] / kv["blocks"]
        )
        yield GaugeMetricFamily(f"{PREFIX}_adapters_resident", "Adapters resident now", value=len(engine.adapters.resident()))
        yield GaugeMetricFamily(f"{PREFIX}_adapters_registered", "Adapters registered (served)", value=len(engine.adapters.registered()))
        stats = engine.stats.snapshot()
        for name, (field, help_text) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=stats[field])
        requests = CounterMetricFamily(f"{PREFIX}_requests", "Requests (prompts) admitted, per served model", labels=["model"])
        tokens = CounterMetricFamily(f"{PREFIX}_generation_tokens", "Tokens generated by finished choices, per served model", labels=["model"])
        for model, entry in sorted(stats["per_model"].items()):
            requests.add_metric([model], entry["requests"])
            tokens.add_metric([model], entry["tokens"])
        yield requests
        yield tokens
