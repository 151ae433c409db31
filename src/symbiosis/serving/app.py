"""The OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, adapter admin,
Prometheus metrics.

``model`` in a request names an adapter or the base model; an unknown name is a 404 with an
OpenAI error body, never a fallback to the base. Streaming answers are server-sent events ending
with ``data: [DONE]``. Admin endpoints load and unload adapters while the server runs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from .engine import EngineClosed, Event
from .generation import ContextLengthError, Generation, GenerationError, Prompts, chat_prompt, completion_prompts, max_new_tokens
from .logprobs import TokenStrings, chat_logprobs, completion_logprobs
from .metrics import ServingMetrics
from .protocol import AdapterLoadRequest, ChatCompletionRequest, CompletionRequest, error_body
from .registry import ModelConflictError, ModelRegistry, ServedModel, UnknownModelError
from .sampling import TokenLogprob

#: Each kind of answer: (id prefix, object of a full response, object of a stream chunk).
_CHAT = ("chatcmpl", "chat.completion", "chat.completion.chunk")
_TEXT = ("cmpl", "text_completion", "text_completion")


def create_app(registry: ModelRegistry, *, api_key: str | None = None, admin_token: str | None = None) -> FastAPI:
    """The API over ``registry``. ``api_key`` guards ``/v1``; ``admin_token`` guards ``/admin`` and
    ``/metrics`` (without it both are open, and ``app.state.admin_open`` says so)."""
    app = FastAPI(title="Symbiosis OpenAI-compatible server")
    app.state.admin_open = admin_token is None
    _install_error_handlers(app)
    v1 = Depends(_bearer(api_key, "invalid_api_key"))
    admin = Depends(_bearer(admin_token, "invalid_admin_token"))
    engine, tokenizer = registry.engine, registry.tokenizer
    strings = TokenStrings(tokenizer)
    metrics = ServingMetrics(engine)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[v1])
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m, registry) for m in registry.models()]}

    @app.get("/v1/models/{name}", dependencies=[v1])
    def get_model(name: str) -> dict[str, Any]:
        return _model_card(registry.get(name), registry)

    @app.post("/v1/completions", dependencies=[v1])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served = registry.get(body.model)
        prompts = completion_prompts(body.prompt, tokenizer)
        max_tokens = max_new_tokens(body.max_tokens, prompts, served, engine.max_sequence)
        params = body.sampling(max_tokens, engine.vocab_size, logprobs=body.logprobs, prompt_logprobs=body.logprobs if body.echo else None)
        answer = _Answer(_TEXT, strings, prompts, params.n, echo=body.echo, logprobs=body.logprobs is not None)
        return await answer.respond(Generation(engine, served, prompts, params, stream=body.stream), served, body, request)

    @app.post("/v1/chat/completions", dependencies=[v1])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        served = registry.get(body.model)
        prompts = chat_prompt([m.as_template_message() for m in body.messages], tokenizer)
        max_tokens = max_new_tokens(body.max_completion_tokens or body.max_tokens, prompts, served, engine.max_sequence)
        params = body.sampling(max_tokens, engine.vocab_size, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        answer = _Answer(_CHAT, strings, prompts, params.n, echo=False, logprobs=body.logprobs)
        return await answer.respond(Generation(engine, served, prompts, params, stream=body.stream), served, body, request)

    @app.get("/admin/adapters", dependencies=[admin])
    def list_adapters() -> dict[str, Any]:
        return {"data": [_model_card(m, registry) for m in registry.models() if m.adapter is not None]}

    @app.post("/admin/adapters", status_code=201, dependencies=[admin])
    async def load_adapter(body: AdapterLoadRequest) -> dict[str, Any]:
        return _model_card(await run_in_threadpool(registry.load_adapter, body.name, body.path), registry)

    @app.delete("/admin/adapters/{name}", dependencies=[admin])
    def unload_adapter(name: str) -> dict[str, Any]:
        registry.unload(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/metrics", dependencies=[admin])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/stats", dependencies=[admin])
    def stats() -> dict[str, Any]:
        executor = registry.executor.local_executor
        return {
            "engine": engine.stats.snapshot() | {"load": engine.load(), "kv_cache": engine.kv_usage(), "resident_adapters": engine.adapters.resident()},
            "executor": executor.stats.total() if executor is not None else None,
        }

    return app


# ------------------------------------------------------------------------------------ answers
class _Answer:
    """One API call's answer, whole or streamed, from its generation's events."""

    def __init__(self, kind: tuple[str, str, str], strings: TokenStrings, prompts: Prompts, n: int, *, echo: bool, logprobs: bool) -> None:
        self.kind, self.strings, self.prompts, self.n = kind, strings, prompts, n
        self.chat = kind is _CHAT
        self.echo, self.logprobs = echo, logprobs

    async def respond(self, generation: Generation, served: ServedModel, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Any:
        """The answer; a client that disconnects before a whole answer is ready cancels its generation
        (a stream's generation is cancelled when the server stops sending it)."""
        head = {"id": f"{self.kind[0]}-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream(generation, head | {"object": self.kind[2]}, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = [_Choice() for _ in range(generation.choices)]

        async def collect() -> None:
            async for event in generation.events():
                choices[event.choice].add(event)

        try:
            await _unless_disconnected(collect(), request)
        finally:
            generation.cancel()
        body = [self._choice(i, c) for i, c in enumerate(choices)]
        return head | {"object": self.kind[1], "choices": body, "usage": self._usage(choices), "system_fingerprint": None}

    def _choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        if self.chat:
            logprobs = chat_logprobs(choice.logprobs, self.strings) if self.logprobs else None
            return {"index": index, "message": {"role": "assistant", "content": choice.text}, "finish_reason": choice.reason, "logprobs": logprobs}
        prompt = index // self.n
        text, logprobs = choice.text, None
        tokens, entries = list(choice.tokens), list(choice.logprobs)
        if self.echo:
            text = self.prompts.texts[prompt] + text
            tokens = self.prompts.ids[prompt] + tokens
            entries = list(choice.prompt_logprobs or [None] * len(self.prompts.ids[prompt])) + entries
        if self.logprobs:
            logprobs = completion_logprobs(tokens, entries, self.strings)
        return {"index": index, "text": text, "finish_reason": choice.reason, "logprobs": logprobs}

    async def _stream(self, generation: Generation, head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text and per finished choice, then ``[DONE]``."""
        extra = {"usage": None} if include_usage else {}
        choices = [_Choice() for _ in range(generation.choices)]

        def chunk(index: int, text: str | None, reason: str | None, logprobs: Any = None, role: bool = False) -> str:
            if self.chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                body = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
            else:
                body = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": logprobs}
            return _sse(head | {"choices": [body]} | extra)

        try:
            if self.chat:
                for index in range(generation.choices):
                    yield chunk(index, "", None, role=True)
            async for event in generation.events():
                choice = choices[event.choice]
                choice.add(event)
                if self.echo and not choice.echoed:
                    choice.echoed = True
                    prompt = event.choice // self.n
                    ids = self.prompts.ids[prompt]
                    entries = event.prompt_logprobs or [None] * len(ids)
                    yield chunk(event.choice, self.prompts.texts[prompt], None, completion_logprobs(ids, entries, self.strings) if self.logprobs else None)
                if event.text or (self.logprobs and event.logprobs):
                    yield chunk(event.choice, event.text, None, self._logprobs(event.token_ids, event.logprobs))
                if event.finish_reason:
                    yield chunk(event.choice, None if self.chat else "", event.finish_reason)
            if include_usage:
                yield _sse(head | {"choices": [], "usage": self._usage(choices)})
        except GenerationError as exc:
            yield _sse(error_body(str(exc), type="server_error"))
        finally:
            generation.cancel()
        yield "data: [DONE]\n\n"

    def _logprobs(self, tokens: tuple[int, ...], entries: tuple[TokenLogprob, ...]) -> Any:
        if not self.logprobs:
            return None
        return chat_logprobs(entries, self.strings) if self.chat else completion_logprobs(tokens, entries, self.strings)

    def _usage(self, choices: list[_Choice]) -> dict[str, int]:
        completion = sum(len(c.tokens) for c in choices)
        prompt = self.prompts.tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Choice:
    """What one choice's events carried so far."""

    def __init__(self) -> None:
        self.text, self.reason = "", None
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self.echoed = False

    def add(self, event: Event) -> None:
        self.text += event.text
        self.tokens += event.token_ids
        self.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finish_reason:
            self.reason = event.finish_reason


async def _unless_disconnected(work: Coroutine[Any, Any, None], request: Request) -> None:
    """Await ``work``; if the client disconnects first, cancel it and raise ``ClientDisconnected``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled: neither task outlives it
        watcher.cancel()
        gone = not task.done()
        if gone:
            task.cancel()
    if gone:
        raise ClientDisconnected
    task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the request's body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody is left to answer."""


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _model_card(served: ServedModel, registry: ModelRegistry) -> dict[str, Any]:
    card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "symbiosis", "root": registry.base_name}
    if served.adapter is not None:
        card |= {"parent": registry.base_name, "peft_type": served.peft_type, "path": str(served.path)}
    return card


# ----------------------------------------------------------------------------- errors and auth
class _Unauthorized(Exception):
    def __init__(self, code: str) -> None:
        self.code = code


def _bearer(secret: str | None, code: str) -> Callable[[Request], None]:
    """A dependency that requires ``Authorization: Bearer <secret>`` (nothing when ``secret`` is None)."""

    def check(request: Request) -> None:
        if secret is not None and request.headers.get("authorization") != f"Bearer {secret}":
            raise _Unauthorized(code)

    return check


def _install_error_handlers(app: FastAPI) -> None:
    def respond(status: int, message: str, **fields: Any) -> JSONResponse:
        return JSONResponse(error_body(message, **fields), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = first["msg"].removeprefix("Value error, ")
        return respond(400, f"{param}: {message}" if param else message, param=param)

    @app.exception_handler(UnknownModelError)
    async def unknown(_: Request, exc: UnknownModelError) -> JSONResponse:
        return respond(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(ModelConflictError)
    async def conflict(_: Request, exc: ModelConflictError) -> JSONResponse:
        return respond(409, str(exc), code="conflict")

    @app.exception_handler(ContextLengthError)
    async def too_long(request: Request, exc: ContextLengthError) -> JSONResponse:
        param = "messages" if request.url.path.endswith("/chat/completions") else "prompt"
        return respond(400, str(exc), param=param, code="context_length_exceeded")

    @app.exception_handler(ClientDisconnected)
    async def gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
        return respond(499, "client closed the request", code="client_disconnected")

    @app.exception_handler(EngineClosed)
    async def closing(_: Request, exc: EngineClosed) -> JSONResponse:
        return respond(503, str(exc), type="server_error", code="shutting_down")

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, exc: ValueError) -> JSONResponse:
        return respond(400, str(exc))

    @app.exception_handler(GenerationError)
    async def failed(_: Request, exc: GenerationError) -> JSONResponse:
        return respond(500, str(exc), type="server_error")

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_: Request, exc: _Unauthorized) -> JSONResponse:
        return respond(401, "Missing or incorrect credentials (Authorization: Bearer ...).", code=exc.code)

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        return respond(exc.status_code, str(exc.detail))
