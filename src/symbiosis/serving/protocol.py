"""The OpenAI request bodies the server accepts, and its OpenAI-style error bodies.

Unknown fields are refused (400) rather than ignored, and so are known OpenAI options this server
does not implement when they ask for something (``suffix``, ``best_of`` other than ``n``): a
request is answered as asked or not at all. ``ignore_eos`` is vLLM's extension (generate
``max_tokens`` tokens whatever comes), accepted for load generators that use it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .sampling import MAX_LOGPROBS, SamplingParams


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers errors."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must lie in [-100, 100], got {bias}")
        return value

    def sampling(self, max_tokens: int, vocab_size: int, *, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters; raises ``ValueError`` for ``logit_bias`` tokens outside the vocabulary."""
        bias = tuple((int(token), float(value)) for token, value in (self.logit_bias or {}).items())
        if any(not 0 <= token < vocab_size for token, _ in bias):
            raise ValueError(f"logit_bias token ids must lie in [0, {vocab_size})")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.n,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt or several (text, or token ids).

    ``echo`` returns the prompt before the completion (with its log-probabilities when ``logprobs``
    is set; the first prompt token has none); ``max_tokens`` 0 with ``echo`` only scores the prompt.
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo (to score the prompt)")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens: 0 cannot be streamed")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of = n)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """The message as chat templates expect it (``developer`` is a system message)."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        return message | ({"name": self.name} if self.name else {})


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``; ``logprobs`` with ``top_logprobs`` alternatives per token."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class AdapterLoadRequest(BaseModel):
    """``POST /admin/adapters``: serve the PEFT directory ``path`` as model ``name``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
