"""From an API call to engine requests and back: prompts, context limits, and events on the event loop.

Engines run on their own threads; a ``Generation`` hands their events to the asyncio loop of the
request that asked (``call_soon_threadsafe``), so handlers simply ``async for`` over the events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .engine import EngineClosed, Event, GenerationRequest
from .registry import ServedModel, UnknownModelError
from .sampling import SamplingParams


class ContextLengthError(ValueError):
    """Prompt plus requested completion exceed the model's context."""


class GenerationError(RuntimeError):
    """The engine failed while generating (the cause is chained)."""


@dataclass(frozen=True)
class Prompts:
    """Tokenized prompts of one call (one for chat, one or more for completions)."""

    ids: list[list[int]]

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
    return Prompts(ids)


def chat_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Prompts:
    """The conversation rendered with the model's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Prompts([tokenizer(text, add_special_tokens=False)["input_ids"]])


def max_new_tokens(requested: int | None, prompts: Prompts, served: ServedModel, context: int | None) -> int:
    """The completion budget: ``requested``, or what the context leaves; raises ``ContextLengthError``.

    The context is the model's, or less where the engine batches sliding-window layers.
    """
    longest = max(len(p) for p in prompts.ids) + served.virtual_tokens
    limits = [n for n in (context, served.engine.max_sequence) if n is not None]
    context = min(limits) if limits else None
    if context is None:
        if requested is None:
            raise ValueError("max_tokens is required: the model's context length is unknown")
        return requested
    budget = requested if requested is not None else context - longest
    if longest + budget > context or budget < 1:
        raise ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{longest + max(budget, 1)} tokens ({longest} in the prompt, {max(budget, 1)} for the completion). "
            "Please reduce the length of the prompt or the completion."
        )
    return budget


class Generation:
    """The engine requests of one API call (``n`` choices per prompt) and their events, in order."""

    def __init__(self, served: ServedModel, prompts: Prompts, params: SamplingParams) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down): stop generating
                self.cancel()

        self.choices = len(prompts.ids) * params.n
        self.requests = [GenerationRequest(ids, params, emit, first_choice=i * params.n) for i, ids in enumerate(prompts.ids)]
        try:
            for request in self.requests:
                served.engine.submit(request)
        except EngineClosed:
            self.cancel()
            raise UnknownModelError(served.name) from None

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
