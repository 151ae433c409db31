"""Continuous batching for one served model (the base, or one adapter), on a thread of its own.

A request's prompt is prefilled on its own, through the PEFT model's forward (so prompt-learning
methods insert their virtual tokens or prefix); its ``n`` choices then join the running batch,
whose rows decode one token per step together, and leave it when they finish or are cancelled.
Several engines (one per adapter) run at once as independent clients of the shared executor, so
their steps meet in the executor's batched GEMMs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from . import kv
from .sampling import SamplingParams, next_token
from .text import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """Output for choice ``choice``: new ``text``; on its last event ``finish_reason`` ("stop" or
    "length") and ``token_ids``, every token generated (a final EOS included); or the ``error``
    that ended the request."""

    choice: int
    text: str = ""
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()
    error: BaseException | None = None

    @property
    def tokens(self) -> int:
        """How many tokens the choice generated (on its last event; 0 before)."""
        return len(self.token_ids)


class EngineClosed(RuntimeError):
    """The engine no longer accepts requests (its adapter is being unloaded, or the server stops)."""


@dataclass(eq=False)
class GenerationRequest:
    """One prompt with ``params.n`` choices; events go to ``emit`` (choice indices from ``first_choice``)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    first_choice: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (its rows leave the batch at the next step)."""
        self.cancelled.set()


@dataclass(eq=False)
class _Row:
    """One choice in the running batch: ``length`` real cache entries; ``generated`` tokens, the last one to feed next."""

    request: GenerationRequest
    choice: int
    generator: torch.Generator
    stream: TextStream
    length: int
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class EngineStats:
    """Counters of one engine: requests admitted (and how many joined a batch already running),
    decode steps, the rows they carried, tokens generated, and rows cancelled before finishing."""

    requests: int = 0
    joined_running_batch: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    max_rows: int = 0
    tokens: int = 0
    cancelled_rows: int = 0


class Engine:
    """Serves ``model`` with continuous batching of at most ``max_rows`` choices per step."""

    def __init__(self, name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, eos_ids: Sequence[int], max_rows: int = 32) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.name = name
        self.model = model.eval()
        self._decoder = model.get_base_model() if isinstance(model, PeftModel) else model
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_rows = max_rows
        self.device = next(p.device for p in model.parameters())
        #: Longest sequence (prompt, virtual tokens and completion) a request may reach; None: the model's context.
        self.max_sequence = kv.batch_limit(DynamicCache(config=model.config))
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._pending: list[GenerationRequest] = []
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------- interface
    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; it joins the running batch at the next step. Raises ``EngineClosed``."""
        if request.params.n > self.max_rows:
            raise ValueError(f"n={request.params.n} exceeds this server's batch of {self.max_rows} rows")
        with self._cond:
            if self._closing:
                raise EngineClosed(f"model {self.name!r} is being unloaded")
            self._pending.append(request)
            self._cond.notify()

    def close(self, *, cancel: bool = False) -> None:
        """Accept no more requests; finish the queued and running ones (or cancel them) and stop."""
        with self._cond:
            self._closing = True
            if cancel:
                for request in self._pending + [row.request for row in self._rows]:
                    request.cancel()
            self._cond.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine's thread to end; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def load(self) -> int:
        """Requests queued or running now."""
        with self._cond:
            return len(self._pending) + len({id(row.request) for row in self._rows})

    # ------------------------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._rows and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending and not self._rows:
                    return
                joining = self._take_pending()
            running = bool(self._rows)
            try:
                with torch.no_grad():
                    for request in joining:
                        self._admit(request, running)
                    self._retire()
                    if self._rows:
                        self._step()
                        self._retire()
            except Exception as exc:  # whatever failed, fail the requests in the batch and keep serving
                log.exception("engine of model %s failed", self.name)
                self._fail(exc)

    def _take_pending(self) -> list[GenerationRequest]:
        """Queued requests that fit next to the running rows (called with the lock held)."""
        taken, rows = [], len(self._rows)
        while self._pending and rows + self._pending[0].params.n <= self.max_rows:
            request = self._pending.pop(0)
            taken.append(request)
            rows += request.params.n
        return taken

    def _admit(self, request: GenerationRequest, running: bool) -> None:
        """Prefill ``request``'s prompt, sample each choice's first token, and add its rows."""
        if request.cancelled.is_set():
            self.stats.cancelled_rows += request.params.n
            return
        try:
            ids = torch.tensor([request.prompt_ids], device=self.device)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            length, limit = kv.seq_length(out.cache), kv.batch_limit(out.cache)
            if limit is not None and length + request.params.max_tokens > limit:
                raise ValueError(f"{length} prompt and {request.params.max_tokens} new tokens exceed this model's {limit} (sliding window)")
        except Exception as exc:
            log.exception("prefill failed for model %s", self.name)
            request.emit(Event(request.first_choice, error=exc))
            return
        kv.repeat_rows(out.cache, request.params.n)
        rows = [
            _Row(request, request.first_choice + i, generator, TextStream(self.tokenizer, request.params.stop), length)
            for i, generator in enumerate(request.params.generators(request.first_choice))
        ]
        self._cache = kv.merge(self._cache, out.cache)
        self._rows.extend(rows)
        self.stats.requests += 1
        self.stats.joined_running_batch += running
        for row in rows:
            self._accept(row, next_token(out.logits[0, -1], request.params, row.generator))

    def _step(self) -> None:
        """One decode step for every row of the running batch."""
        width = kv.seq_length(self._cache)
        mask = torch.zeros(len(self._rows), width + 1, dtype=torch.long, device=self.device)
        for i, row in enumerate(self._rows):
            mask[i, width - row.length :] = 1
        positions = torch.tensor([[row.length] for row in self._rows], device=self.device)
        tokens = torch.tensor([[row.generated[-1]] for row in self._rows], device=self.device)
        out = self._decoder(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self._cache, use_cache=True)
        self._cache = out.cache
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(self._rows)
        self.stats.max_rows = max(self.stats.max_rows, len(self._rows))
        for i, row in enumerate(self._rows):
            row.length += 1
            self._accept(row, next_token(out.logits[i, -1], row.request.params, row.generator))

    def _accept(self, row: _Row, token: int) -> None:
        """Record ``row``'s new token and emit its text; finish the row on EOS, a stop or max_tokens."""
        row.generated.append(token)
        self.stats.tokens += 1
        if token in self.eos_ids:
            text, reason = row.stream.flush(), "stop"
        else:
            text, stopped = row.stream.push(token)
            reason = "stop" if stopped else "length" if len(row.generated) >= row.request.params.max_tokens else None
            if reason == "length":
                text += row.stream.flush()
        row.done = reason is not None
        if text or row.done:
            row.request.emit(Event(row.choice, text, finish_reason=reason, token_ids=tuple(row.generated) if row.done else ()))

    def _fail(self, error: Exception) -> None:
        """End every row of the running batch with ``error`` (its requests fail; queued ones stay)."""
        for row in self._rows:
            if not row.done:
                row.request.emit(Event(row.choice, error=error))
        self._rows, self._cache = [], None

    def _retire(self) -> None:
        """Drop finished and cancelled rows from the batch and its cache."""
        keep = [i for i, row in enumerate(self._rows) if not row.done and not row.request.cancelled.is_set()]
        if len(keep) == len(self._rows):
            return
        self.stats.cancelled_rows += sum(not row.done for row in self._rows) - len(keep)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = None
        else:
            kv.keep_rows(self._cache, keep, max(row.length for row in self._rows))
