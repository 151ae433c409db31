"""One engine per served base model: every adapter's requests in one forward per step.

The engine owns one Symbiosis client of the executor (the base model, with ``RowDispatch`` wrappers
on its base modules) and, on a thread of its own, repeats:

1. admit new requests, drop cancelled ones, make offered adapters resident (``AdapterStore``);
2. schedule (``Scheduler``): decoding sequences and prompt chunks under a token budget and the
   KV cache's free blocks;
3. run ONE forward over every scheduled token, whatever its sequence's adapter and PEFT method:
   the tokens are packed into ``[1, N]`` rows grouped by adapter; each base module computes its
   product once for all rows (so each executor op gets one request per step carrying every row),
   adapters apply their PEFT layers to their own rows, and attention reads each sequence's own
   paged cache (``serving.attention``); prompt tuning's virtual tokens enter as input embeddings,
   prefix tuning's keys and values are written into the sequence's cache when it is admitted;
4. sample each sequence's next token (own generator, penalties, bias; log-probabilities when
   asked), detokenize, stop, emit events, free finished sequences' blocks.

A request's answer does not depend on its neighbours: rows never mix except inside the executor's
row-wise products (see ``docs/serving.md`` for the measured bound).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from peft.tuners.lora.layer import ParamWrapper
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UnsupportedFeatureError
from ..executor.executor import set_own_thread_count
from . import batch
from .adapters import AdapterInfo, AdapterLoadError, AdapterStore, LoadedAdapter
from .adapters import layer as dispatch
from .adapters import parameters
from .attention import ATTENTION, AttentionPlan, LayoutProbe, PrefillSegment
from .kv import CacheLayout, PagedKVCache
from .sampling import SamplingParams, TokenLogprob, next_token, token_logprobs
from .scheduler import Chunk, Scheduler, Sequence
from .text import TextStream

log = logging.getLogger(__name__)

#: KV cache budget when none is given: enough for every sequence at full context, at most this.
DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Event:
    """Output of choice ``choice``: ``text`` released since its previous event and the tokens generated
    since then (``token_ids``, with ``logprobs`` when asked); the prompt's log-probabilities once (first
    event, when asked); on its last event ``finish_reason`` ("stop" or "length"); or the ``error`` that
    ended the request. A request that does not stream gets one event per choice, with everything."""

    choice: int
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Finished:
    """A choice that ended with a ``reason`` ("stop" or "length"): its served ``model``, its prompt and
    generated token counts, and seconds from its request's submission to its first token and to its end."""

    model: str
    prompt_tokens: int
    generated_tokens: int
    first_token_s: float | None
    total_s: float
    reason: str


class EngineClosed(RuntimeError):
    """The engine no longer accepts requests (the server stops)."""


@dataclass(eq=False)
class GenerationRequest:
    """One prompt with ``params.n`` choices for ``adapter`` (None: the base model); events go to
    ``emit`` (choice indices from ``first_choice``), as they come when ``stream``, else once per choice."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    adapter: AdapterInfo | None = None
    first_choice: int = 0
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Stop generating for this request (its rows leave the batch at the next step)."""
        self.cancelled.set()


@dataclass
class EngineStats:
    """Counters of the engine: requests, steps and the token rows they computed (prompt and decode),
    the most rows and sequences in a step, steps that mixed several adapters (the bare base counting
    as one), generated tokens, cancelled and preempted sequences, prompt positions taken from the
    prefix cache, adapter loads and evictions; and
    requests and generated tokens per served model."""

    requests: int = 0
    steps: int = 0
    rows: int = 0
    decode_rows: int = 0
    prefill_rows: int = 0
    max_rows: int = 0
    max_seqs: int = 0
    mixed_steps: int = 0
    max_adapters_in_step: int = 0
    tokens: int = 0
    cancelled: int = 0
    preemptions: int = 0
    cached_tokens: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, model: str, **counts: int) -> None:
        with self._lock:
            entry = self.per_model.setdefault(model, {"requests": 0, "tokens": 0})
            for key, value in counts.items():
                entry[key] += value

    def snapshot(self) -> dict[str, Any]:
        """The counters as a plain dict (safe to call from any thread)."""
        with self._lock:
            values = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
            values["per_model"] = {model: dict(entry) for model, entry in self.per_model.items()}
        return values


class Engine:
    """Serves base model ``model`` (a Symbiosis client) and the adapters in ``adapters``.

    ``max_seqs``: sequences running at once; ``max_step_tokens``: token rows per step (decode rows
    plus prompt chunks); ``kv_cache_bytes``: the KV cache's memory budget (default: a full context for
    every sequence, at most 1 GiB); ``max_adapters``: resident adapters; ``base_name``: the base
    model's name in statistics; ``prefix_caching``: reuse the cached blocks of prompt starts computed
    before; ``threads``: intra-op threads of the engine's own computation (model code, adapters,
    attention, sampling), while the executor's products keep the executor's count. The engine takes
    ``model`` over (attention implementation, wrappers).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        eos_ids: Iterable[int],
        max_seqs: int = 64,
        max_step_tokens: int = 256,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        max_adapters: int = 64,
        base_name: str = "base",
        prefix_caching: bool = True,
        threads: int = 1,
    ) -> None:
        if not hasattr(model, "symbiosis") or hasattr(model, "peft_config"):
            raise TypeError("the engine serves a Symbiosis client of the base model (load_model); register adapters with engine.adapters")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.base_name = base_name
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.vocab_size = int(model.config.vocab_size)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        _check_architecture(model)
        model.set_attn_implementation(ATTENTION)
        self.wrappers = dispatch.install(model)
        self._embed = model.get_input_embeddings()
        self.device = self._embed.weight.device
        layout = self._probe_layout()
        if kv_cache_bytes is None:
            kv_cache_bytes = min(DEFAULT_KV_CACHE_BYTES, max_seqs * (self.context_length or 4096) * layout.bytes_per_token)
        self.cache = PagedKVCache.within(layout, kv_cache_bytes, block_size, device=self.device)
        self.scheduler = Scheduler(self.cache, max_seqs=max_seqs, max_step_tokens=max_step_tokens, prefix_caching=prefix_caching)
        self.adapters = AdapterStore(model, max_resident=max_adapters, attach=self._attach, detach=self._detach)
        #: Longest sequence (virtual tokens, prompt and completion) a request may reach.
        self.max_sequence = min(n for n in (self.context_length, self.cache.capacity_tokens) if n)
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._incoming: list[GenerationRequest] = []
        self._arrivals = 0
        self._closing = False
        self._failure: Exception | None = None
        self._listeners: list[Callable[[Finished], None]] = []
        self._thread = threading.Thread(target=self._loop, name="serving-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------- interface
    def submit(self, *requests: GenerationRequest) -> None:
        """Queue ``requests`` (together: they can start in the same step). Raises ``ValueError`` for a
        request that can never run, ``EngineClosed`` once closing."""
        for request in requests:
            self._validate(request)
        with self._cond:
            if self._failure is not None:
                raise EngineClosed(f"the serving engine stopped after an internal error: {self._failure}")
            if self._closing:
                raise EngineClosed("the server is shutting down")
            self._incoming.extend(requests)
            self._cond.notify()

    def on_finish(self, listener: Callable[[Finished], None]) -> None:
        """Call ``listener`` (on the engine's thread: it must be quick) for every choice that finishes."""
        self._listeners.append(listener)

    def close(self, *, cancel: bool = False) -> None:
        """Accept no more requests; finish the queued and running ones (or cancel them) and stop."""
        with self._cond:
            self._closing = True
            if cancel:
                for request in self._incoming:
                    request.cancel()
                for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                    seq.request.cancel()
            self._cond.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine's thread to end; True if it has."""
        self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if ended:
            self.adapters.close()
        return ended

    def load(self) -> int:
        """Requests queued or running now."""
        with self._cond:
            seqs = [*self.scheduler.running, *self.scheduler.waiting]
            return len(self._incoming) + len({id(seq.request) for seq in seqs})

    def occupancy(self) -> tuple[int, int]:
        """Sequences running now; requests and sequences waiting to start."""
        with self._cond:
            return len(self.scheduler.running), len(self._incoming) + len(self.scheduler.waiting)

    def kv_usage(self) -> dict[str, int]:
        pool = self.cache.pool
        return {"blocks": pool.capacity, "free_blocks": pool.free, "block_size": self.cache.block_size}

    def _validate(self, request: GenerationRequest) -> None:
        ids, params = request.prompt_ids, request.params
        if not ids or any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"a prompt needs at least one token, and token ids must lie in [0, {self.vocab_size})")
        virtual = request.adapter.virtual_tokens if request.adapter is not None else 0
        needed = virtual + len(ids) + params.max_tokens
        if needed > self.max_sequence:
            raise ValueError(f"{virtual + len(ids)} prompt and {params.max_tokens} new tokens exceed this server's {self.max_sequence} tokens per sequence")
        if params.n > self.scheduler.max_seqs:
            raise ValueError(f"n={params.n} exceeds this server's {self.scheduler.max_seqs} running sequences")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop sequences need a tokenizer; this engine serves token ids only")

    # ------------------------------------------------------------------------------------ loop
    def _loop(self) -> None:
        set_own_thread_count(self.threads)
        try:
            self._serve()
        except Exception as exc:  # an engine bug: fail every request and refuse new ones, never leave them waiting
            log.exception("the serving engine stopped")
            with self._cond:
                self._closing = True
                self._failure = exc
                incoming, self._incoming = self._incoming, []
            for request in incoming:
                request.emit(Event(request.first_choice, error=exc))
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                self._fail(seq, exc)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self.scheduler.has_work() and not self._closing:
                    self._cond.wait()
                if self._closing and not self._incoming and not self.scheduler.has_work():
                    return
                incoming, self._incoming = self._incoming, []
            for request in incoming:
                try:
                    self._admit_request(request)
                except Exception as exc:  # noqa: BLE001 - fail the request, keep serving
                    request.emit(Event(request.first_choice, error=exc))
            self._drop_cancelled()
            self.adapters.collect()
            failed: list[tuple[Sequence, Exception]] = []
            chunks = self.scheduler.schedule(lambda seq: self._ready(seq, failed))
            for seq, error in failed:
                self._fail(seq, error)
            if not chunks:
                with self._cond:  # waiting for an adapter to load, or for room
                    self._cond.wait(timeout=0.005)
                continue
            try:
                with torch.no_grad():
                    self._step(chunks)
            except Exception as exc:  # whatever failed, fail this step's sequences and keep serving
                log.exception("engine step failed")
                for chunk in chunks:
                    self._fail(chunk.seq, exc)

    def _admit_request(self, request: GenerationRequest) -> None:
        params = request.params
        self.stats.requests += 1
        self.stats.count(self._model_name(request.adapter), requests=1)
        generator = params.generators(request.first_choice)[0]
        seq = Sequence(
            request=request,
            choice=request.first_choice,
            tokens=list(request.prompt_ids),
            prompt_len=len(request.prompt_ids),
            arrival=self._next_arrival(),
            generator=generator,
            stream=TextStream(self.tokenizer, params.stop),
            info=request.adapter,
            forks=params.n - 1,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        self.scheduler.add(seq)

    def _ready(self, seq: Sequence, failed: list) -> bool:
        """Whether ``seq``'s adapter is resident (held for it from then on); loading failures go to ``failed``."""
        if seq.info is None or seq.adapter is not None:
            return True
        try:
            seq.adapter = self.adapters.acquire(seq.info)
        except AdapterLoadError as exc:
            failed.append((seq, exc))
            return False
        return seq.adapter is not None

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.cancelled]:
            self._release(seq)
            self.stats.cancelled += 1

    # ------------------------------------------------------------------------------------ step
    def _step(self, chunks: list[Chunk]) -> None:
        """One forward over every chunk, then each sequence's next token."""
        # rows grouped by adapter, adapters by method: a module's LoRA groups sit next to each other
        chunks.sort(key=lambda c: (c.seq.adapter is not None, c.seq.adapter and c.seq.adapter.info.peft_type, id(c.seq.adapter)))
        size = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keys: list[LoadedAdapter | None] = []
        virtual: list[tuple[int, torch.Tensor]] = []
        decode_rows, decode_tables, decode_lengths = [], [], []
        prefills: list[PrefillSegment] = []
        keep: list[int] = []
        prompt_rows: list[tuple[Chunk, int, int]] = []  # (chunk, first kept index, first prompt position)
        next_rows: list[tuple[Chunk, int]] = []
        for chunk in chunks:
            seq, start, stop = chunk.seq, chunk.start, chunk.stop
            if chunk.write_prefix:
                self._write_prefix(seq)
            row, v = len(ids), seq.virtual
            prompt_embedded = max(0, min(stop, v) - start) if seq.adapter is not None and seq.adapter.prompt is not None else 0
            if prompt_embedded:
                virtual.append((row, seq.adapter.prompt[start : start + prompt_embedded]))
            ids += [0] * prompt_embedded + seq.tokens[max(start, v) - v : stop - v]
            positions += range(start, stop)
            slots += [seq.blocks[p // size] * size + p % size for p in range(start, stop)]
            keys += [seq.adapter] * chunk.count
            if chunk.count == 1:
                decode_rows.append(row)
                decode_tables.append(seq.blocks)
                decode_lengths.append(stop)
            else:
                prefills.append(PrefillSegment(row, chunk.count, self.cache.slots(seq.blocks, 0, stop)))
            if seq.prompt_logprobs is not None and not seq.sent_prompt_logprobs:
                first, last = max(start, v), min(stop, v + seq.prompt_len - 1)
                if last > first:
                    prompt_rows.append((chunk, len(keep), first))
                    keep += range(row + first - start, row + last - start)
            if stop == seq.total and seq.request.params.max_tokens > 0:
                next_rows.append((chunk, len(keep)))
                keep.append(row + chunk.count - 1)
        device = self.device
        plan = AttentionPlan(self.cache, torch.tensor(slots, device=device))
        if decode_rows:
            plan.decode_rows = torch.tensor(decode_rows, device=device)
            plan.decode_slots = self.cache.padded_slots(decode_tables, decode_lengths)
            plan.decode_lengths = torch.tensor(decode_lengths, device=device)
        plan.prefills = prefills
        step = batch.StepBatch(batch.contiguous_groups(keys), batch.contiguous_groups([keys[r] for r in keep]), plan)
        with batch.active(step):
            embeddings = self._embed(torch.tensor([ids], device=device))
            for row, vectors in virtual:
                embeddings[0, row : row + vectors.shape[0]] = vectors.to(embeddings.dtype)
            logits = self.model(
                inputs_embeds=embeddings,
                position_ids=torch.tensor([positions], device=device),
                use_cache=False,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
            ).logits[0]
        self._account(chunks, step, len(ids))
        for chunk in chunks:
            chunk.seq.computed = chunk.stop
            self.scheduler.register_computed(chunk.seq)
        for chunk, first_kept, first in prompt_rows:
            self._prompt_logprobs(chunk.seq, logits, first_kept, first, min(chunk.stop, chunk.seq.virtual + chunk.seq.prompt_len - 1))
        argmax = logits.argmax(-1).tolist() if next_rows else []  # one op for every plain greedy row
        for chunk, index in next_rows:
            self._sample(chunk.seq, logits[index], argmax[index])
        for chunk in chunks:  # prompts scored only (max_tokens 0): done once prefilled
            seq = chunk.seq
            if seq.request.params.max_tokens == 0 and seq.computed == seq.total:
                for s in (seq, *(self._fork(seq) if seq.forks else ())):
                    s.finish_reason = "length"
                    self._deliver(s, "")

    def _write_prefix(self, seq: Sequence) -> None:
        """Write the adapter's prefix keys and values into positions ``[0, virtual)`` of ``seq``."""
        slots = self.cache.slots(seq.blocks, 0, seq.virtual)
        for layer, (keys, values) in enumerate(seq.adapter.prefix):
            self.cache.write(layer, slots, keys.transpose(0, 1), values.transpose(0, 1))
        seq.computed = seq.virtual

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, first_kept: int, first: int, last: int) -> None:
        """Log-probabilities of the prompt tokens predicted at positions ``[first, last)``."""
        params, v = seq.request.params, seq.virtual
        targets = seq.tokens[first - v + 1 : last - v + 1]
        seq.prompt_logprobs += token_logprobs(logits[first_kept : first_kept + len(targets)], targets, params.prompt_logprobs)

    def _sample(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> None:
        """``seq``'s next token from its logits row (and its forks' first tokens from the same row)."""
        children = self._fork(seq) if seq.forks else []
        for s in (seq, *children):
            params = s.request.params
            token = argmax if params.plain_greedy else next_token(logits, params, s.generator, s.generated)
            logprob = token_logprobs(logits[None], [token], params.logprobs)[0] if params.logprobs is not None else None
            self._accept(s, token, logprob)

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """The other ``n - 1`` choices of ``seq``'s request, sharing its prompt's cache."""
        params, count = seq.request.params, seq.forks
        generators = params.generators(seq.request.first_choice)[1:]
        children = []
        for i in range(count):
            child = Sequence(
                request=seq.request,
                choice=seq.choice + 1 + i,
                tokens=list(seq.tokens),
                prompt_len=seq.prompt_len,
                arrival=self._next_arrival(),
                generator=generators[i],
                stream=TextStream(self.tokenizer, params.stop),
                info=seq.info,
                prompt_logprobs=list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None,
            )
            if seq.adapter is not None:
                child.adapter = self.adapters.acquire(seq.info)
            self.scheduler.fork(seq, child)
            children.append(child)
        seq.forks = 0
        return children

    def _accept(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Record ``seq``'s new token; emit its text; finish it on EOS, a stop string or ``max_tokens``."""
        params = seq.request.params
        seq.tokens.append(token)
        seq.pending_tokens.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        self.stats.tokens += 1
        if token in self.eos_ids and not params.ignore_eos:
            text, reason = seq.stream.flush(), "stop"
        else:
            text, stopped = seq.stream.push(token)
            reason = "stop" if stopped else "length" if len(seq.tokens) - seq.prompt_len >= params.max_tokens else None
            if reason == "length":
                text += seq.stream.flush()
        seq.finish_reason = reason
        self._deliver(seq, text)

    def _deliver(self, seq: Sequence, text: str) -> None:
        """Emit what ``seq`` has for its client: each step when streaming, else everything once, at its end."""
        request = seq.request
        done = seq.finish_reason is not None
        if not request.stream and not done:
            seq.text += text
            return
        prompt = None
        if seq.prompt_logprobs is not None and not seq.sent_prompt_logprobs and seq.computed >= seq.virtual + seq.prompt_len:
            prompt, seq.sent_prompt_logprobs = tuple(seq.prompt_logprobs), True
        text = text if request.stream else seq.text + text
        if text or done or prompt is not None or seq.pending_tokens:
            request.emit(Event(seq.choice, text, tuple(seq.pending_tokens), tuple(seq.pending_logprobs), prompt, seq.finish_reason))
        seq.pending_tokens, seq.pending_logprobs = [], []
        if done:
            model, generated = self._model_name(seq.info), len(seq.tokens) - seq.prompt_len
            self.stats.count(model, tokens=generated)
            self._release(seq)
            if self._listeners:
                start, first = request.submitted, seq.first_token_at
                self._report(Finished(model, seq.prompt_len, generated, None if first is None else first - start, time.monotonic() - start, seq.finish_reason))

    def _report(self, finished: Finished) -> None:
        for listener in self._listeners:
            try:
                listener(finished)
            except Exception:  # a listener must never fail a request
                log.exception("a finish listener failed")

    def _release(self, seq: Sequence) -> None:
        """Take ``seq`` out of the engine and give back its blocks and its hold on its adapter."""
        self.scheduler.remove(seq)
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)
            seq.adapter = None

    def _fail(self, seq: Sequence, error: Exception) -> None:
        if seq.finish_reason is None:
            seq.request.emit(Event(seq.choice, error=error))
            seq.finish_reason = "error"
        self._release(seq)

    def _account(self, chunks: list[Chunk], step: batch.StepBatch, rows: int) -> None:
        stats = self.stats
        stats.steps += 1
        stats.rows += rows
        decode = sum(chunk.count == 1 for chunk in chunks)
        stats.decode_rows += decode
        stats.prefill_rows += rows - decode
        stats.max_rows = max(stats.max_rows, rows)
        stats.max_seqs = max(stats.max_seqs, len(chunks))
        adapters = len(step.groups)
        stats.mixed_steps += adapters > 1
        stats.max_adapters_in_step = max(stats.max_adapters_in_step, adapters)
        stats.preemptions = self.scheduler.preemptions
        stats.cached_tokens = self.scheduler.cached_tokens
        stats.adapter_loads, stats.adapter_evictions = self.adapters.loads, self.adapters.evictions

    # -------------------------------------------------------------------------------- adapters
    def _attach(self, loaded: LoadedAdapter) -> None:
        """Serve ``loaded``'s PEFT layers on its rows (engine thread, between steps)."""
        if loaded.prefix is not None:
            shapes = tuple((k.shape[0], k.shape[2], v.shape[2]) for k, v in loaded.prefix)
            if shapes != self.cache.layout.layers:
                raise AdapterLoadError(f"adapter {loaded.name!r}: its prefix has shapes {shapes}, this model's cache {self.cache.layout.layers}")
        if loaded.prompt is not None and loaded.prompt.shape[-1] != self._embed.weight.shape[-1]:
            raise AdapterLoadError(f"adapter {loaded.name!r}: its virtual tokens are {loaded.prompt.shape[-1]} wide, this model's embeddings {self._embed.weight.shape[-1]}")
        attached = []
        try:
            for path, layer in loaded.layers.items():
                if isinstance(layer, ParamWrapper):  # LoRA on parameters (mixture-of-experts experts, routers)
                    wrapper = parameters.wrap(self.model, path)
                    wrapper.attach(loaded, layer)
                    attached.append(wrapper)
                    continue
                wrapper = dispatch.wrap(self.model, path)
                side = wrapper.attach(loaded, layer)
                attached.append(wrapper)
                if side is dispatch.Side.OWN:
                    log.warning("adapter %s: the PEFT layer on %s gets a base product of its own (not batched)", loaded.name, path)
        except Exception:
            for wrapper in attached:
                wrapper.detach(loaded)
            raise

    def _detach(self, loaded: LoadedAdapter) -> None:
        for path in loaded.layers:
            self.model.get_submodule(path).detach(loaded)

    # --------------------------------------------------------------------------------- helpers
    def _probe_layout(self) -> CacheLayout:
        """One token through the model to learn each attention layer's cache entry shape."""
        probe = LayoutProbe()
        with torch.no_grad(), batch.active(batch.StepBatch((), (), probe)):
            zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.model(inputs_embeds=self._embed(zero), position_ids=zero, use_cache=False, logits_to_keep=1)
        if not probe.layers or sorted(probe.layers) != list(range(len(probe.layers))):
            raise UnsupportedFeatureError(f"the serving engine needs one attention layer per index; this model reported layers {sorted(probe.layers)}")
        dtype = self._embed.weight.dtype
        return CacheLayout(tuple(probe.layers[i] for i in range(len(probe.layers))), dtype)

    def _model_name(self, info: AdapterInfo | None) -> str:
        return info.name if info is not None else self.base_name

    def _next_arrival(self) -> int:
        self._arrivals += 1
        return self._arrivals


def _check_architecture(model: PreTrainedModel) -> None:
    """Refuse models whose layers are not all full, sliding-window or chunked attention (e.g. linear attention, state-space)."""
    kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    unsupported = kinds - {"full_attention", "sliding_attention", "chunked_attention"}
    if unsupported:
        raise UnsupportedFeatureError(f"the serving engine batches full, sliding-window and chunked attention; this model has {sorted(unsupported)} layers")


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids: the generation config's (e.g. an end-of-turn token too) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id} - {None}


