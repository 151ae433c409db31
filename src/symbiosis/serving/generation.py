"""From an API call to engine requests and back: prompts, context limits, and events on the event loop.

The engine runs on its own thread; a ``Generation`` hands its events to the asyncio loop of the
request that asked (``call_soon_threadsafe``, once per batch of events), so handlers simply
``async for`` over the events.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .engine import Engine, Event, GenerationRequest
from .registry import ServedModel
from .sampling import SamplingParams


class ContextLengthError(ValueError):
    """Prompt plus requested completion exceed the model's context."""


class GenerationError(RuntimeError):
    """The engine failed while generating (the cause is chained)."""


@dataclass(frozen=True)
class Prompts:
    """Tokenized prompts of one call (one for chat, one or more for completions), and their texts
    (the text given, or the ids decoded)."""

    ids: list[list[int]]
    texts: list[str]

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.ids)


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]], tokenizer: PreTrainedTokenizerBase) -> Prompts:
    """Text prompts are tokenized like the tokenizer does by default (e.g. with BOS); ids pass as they are."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]
    vocab = len(tokenizer)
    if any(not p for p in ids) or any(not 0 <= t < vocab for p in ids for t in p):
        raise ValueError(f"every prompt needs at least one token, and token ids must lie in [0, {vocab})")
    texts = [p if isinstance(p, str) else tokenizer.decode(i, skip_special_tokens=True) for p, i in zip(prompt, ids)]
    return Prompts(ids, texts)


def chat_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Prompts:
    """The conversation rendered with the model's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Prompts([tokenizer(text, add_special_tokens=False)["input_ids"]], [text])


def max_new_tokens(requested: int | None, prompts: Prompts, served: ServedModel, limit: int) -> int:
    """The completion budget: ``requested``, or what the context leaves; raises ``ContextLengthError``.

    ``limit`` is the longest sequence the engine runs (the model's context, or less where the KV
    cache holds less); an adapter's virtual tokens count against it.
    """
    longest = max(len(p) for p in prompts.ids) + served.virtual_tokens
    budget = requested if requested is not None else limit - longest
    if longest + budget > limit or budget < 0 or (requested is None and budget < 1):
        shown = max(budget, 1 if requested is None else 0)
        raise ContextLengthError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{longest + shown} tokens ({longest} in the prompt, {shown} for the completion). "
            "Please reduce the length of the prompt or the completion."
        )
    return budget


class _Relay:
    """Hands events from the engine's thread to one event loop, waking the loop once for all the
    events that arrive before it runs (a step's events for every request), not once per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def put(self, queue: asyncio.Queue, event: Event) -> None:
        """Queue ``event`` for ``queue``; raises ``RuntimeError`` once the loop is closed."""
        if self.loop.is_closed():
            raise RuntimeError("event loop is closed")
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a drain is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._pending.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_relays: dict[asyncio.AbstractEventLoop, _Relay] = {}


def _relay(loop: asyncio.AbstractEventLoop) -> _Relay:
    relay = _relays.get(loop)
    if relay is None:
        for stale in [other for other in _relays if other.is_closed()]:
            del _relays[stale]
        relay = _relays[loop] = _Relay(loop)
    return relay


class Generation:
    """The engine requests of one API call (``n`` choices per prompt) and their events, in order."""

    def __init__(self, engine: Engine, served: ServedModel, prompts: Prompts, params: SamplingParams, *, stream: bool) -> None:
        relay = _relay(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                relay.put(self._queue, event)
            except RuntimeError:  # the loop is gone (server shutting down): stop generating
                self.cancel()

        self.choices = len(prompts.ids) * params.n
        self.requests = [
            GenerationRequest(ids, params, emit, adapter=served.adapter, first_choice=i * params.n, stream=stream) for i, ids in enumerate(prompts.ids)
        ]
        engine.submit(*self.requests)

    async def events(self) -> AsyncIterator[Event]:
        """Every event until all choices have finished; raises ``GenerationError`` if the engine failed."""
        unfinished = self.choices
        while unfinished:
            event = await self._queue.get()
            if event.error is not None:
                self.cancel()
                raise GenerationError(f"generation failed: {event.error}") from event.error
            unfinished -= event.finish_reason is not None
            yield event

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()
