"""The OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, adapter admin.

``model`` in a request names an adapter or the base model; an unknown name is a 404 with an
OpenAI error body, never a fallback to the base. Streaming answers are server-sent events ending
with ``data: [DONE]``. Admin endpoints load and unload adapters while the server runs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .generation import ContextLengthError, Generation, GenerationError, Prompts, chat_prompt, completion_prompts, max_new_tokens
from .protocol import AdapterLoadRequest, ChatCompletionRequest, CompletionRequest, error_body
from .registry import ModelConflictError, ModelRegistry, ServedModel, UnknownModelError

#: Each kind of answer: (id prefix, object of a full response, object of a stream chunk).
_CHAT = ("chatcmpl", "chat.completion", "chat.completion.chunk")
_TEXT = ("cmpl", "text_completion", "text_completion")


def create_app(registry: ModelRegistry, *, api_key: str | None = None, admin_token: str | None = None) -> FastAPI:
    """The API over ``registry``. ``api_key`` guards ``/v1``; ``admin_token`` guards ``/admin``
    (without it ``/admin`` is open, and ``app.state.admin_open`` says so)."""
    app = FastAPI(title="Symbiosis OpenAI-compatible server")
    app.state.admin_open = admin_token is None
    _install_error_handlers(app)
    v1 = Depends(_bearer(api_key, "invalid_api_key"))
    admin = Depends(_bearer(admin_token, "invalid_admin_token"))

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
    async def completions(body: CompletionRequest) -> Any:
        served = registry.get(body.model)
        prompts = completion_prompts(body.prompt, registry.tokenizer)
        return await _answer(body, served, prompts, max_new_tokens(body.max_tokens, prompts, served, registry.context_length), _TEXT)

    @app.post("/v1/chat/completions", dependencies=[v1])
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        served = registry.get(body.model)
        prompts = chat_prompt([m.as_template_message() for m in body.messages], registry.tokenizer)
        requested = body.max_completion_tokens or body.max_tokens
        return await _answer(body, served, prompts, max_new_tokens(requested, prompts, served, registry.context_length), _CHAT)

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

    @app.get("/admin/stats", dependencies=[admin])
    def stats() -> dict[str, Any]:
        executor = registry.executor.local_executor
        return {
            "models": {m.name: {**asdict(m.engine.stats), "load": m.engine.load()} for m in registry.models()},
            "executor": executor.stats.total() if executor is not None else None,
        }

    return app


# ------------------------------------------------------------------------------------ answers
async def _answer(body: CompletionRequest | ChatCompletionRequest, served: ServedModel, prompts: Prompts, max_tokens: int, kind: tuple[str, str, str]) -> Any:
    generation = Generation(served, prompts, body.sampling(max_tokens))
    head = {"id": f"{kind[0]}-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(generation, head | {"object": kind[2]}, prompts, chat=kind is _CHAT, include_usage=include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, reasons, tokens = [""] * generation.choices, [None] * generation.choices, 0
    try:
        async for event in generation.events():
            texts[event.choice] += event.text
            if event.finish_reason:
                reasons[event.choice] = event.finish_reason
                tokens += event.tokens
    finally:
        generation.cancel()
    if kind is _CHAT:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
    return head | {"object": kind[1], "choices": choices, "usage": _usage(prompts, tokens), "system_fingerprint": None}


async def _stream(generation: Generation, head: dict[str, Any], prompts: Prompts, *, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text and per finished choice, then ``[DONE]``."""
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: int, text: str | None, finish_reason: str | None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            body = {"index": choice, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            body = {"index": choice, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return _sse(head | {"choices": [body]} | extra)

    tokens = 0
    try:
        if chat:
            for choice in range(generation.choices):
                yield chunk(choice, "", None, role=True)
        async for event in generation.events():
            if event.text:
                yield chunk(event.choice, event.text, None)
            if event.finish_reason:
                tokens += event.tokens
                yield chunk(event.choice, None if chat else "", event.finish_reason)
        if include_usage:
            yield _sse(head | {"choices": [], "usage": _usage(prompts, tokens)})
    except GenerationError as exc:
        yield _sse(error_body(str(exc), type="server_error"))
    finally:
        generation.cancel()
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(prompts: Prompts, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompts.tokens, "completion_tokens": completion_tokens, "total_tokens": prompts.tokens + completion_tokens}


def _model_card(served: ServedModel, registry: ModelRegistry) -> dict[str, Any]:
    card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "symbiosis", "root": registry.base_name}
    if served.adapter is not None:
        card |= {"parent": registry.base_name, "peft_type": served.peft_type, "path": str(served.adapter)}
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
    async def too_long(_: Request, exc: ContextLengthError) -> JSONResponse:
        return respond(400, str(exc), param="messages", code="context_length_exceeded")

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
