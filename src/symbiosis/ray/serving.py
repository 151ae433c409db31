"""``serve-openai`` as a Ray Serve deployment: the same OpenAI-compatible app, replicas behind Serve's proxy.

Each Serve replica builds exactly what ``symbiosis serve-openai`` builds — a ``ModelRegistry`` of
clients of the executor (typically ``symbiosis+ray://NAME``, resolved from inside the cluster) and
``create_app`` over it — so the API is unchanged; Serve's proxy spreads HTTP requests over the
replicas. The adapters are the deployment's ``user_config`` (``{"adapters": {name: dir}}``): every
replica loads them, and deploying again with another set loads and unloads adapters on every
replica without restarting it (Serve calls ``reconfigure``). ``POST``/``DELETE /admin/adapters``
would change one replica only, so this deployment refuses them (409) and says how to change the set.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ..transport.ray_directory import init_ray

ADAPTERS_PATH = "/admin/adapters"


@serve.deployment
@serve.ingress()
class OpenAIServer:
    """One Serve replica: the OpenAI-compatible app over its own clients of the executor."""

    async def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.registry = await asyncio.to_thread(_model_registry, options)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from ..serving import create_app
        from ..serving.protocol import error_body

        app = create_app(self.registry, api_key=self.options["api_key"], admin_token=self.options["admin_token"])

        @app.middleware("http")
        async def adapters_are_configuration(request: Request, call_next: Any) -> Any:
            if request.url.path.startswith(ADAPTERS_PATH) and request.method in ("POST", "DELETE"):
                message = (
                    "this server runs as a Ray Serve deployment with several replicas: change its adapters with "
                    "`symbiosis ray serve-openai ... --adapter NAME=DIR` (every replica loads them), not through /admin"
                )
                return JSONResponse(error_body(message, code="conflict"), status_code=409)
            return await call_next(request)

        return app

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve exactly the adapters ``config["adapters"]`` names (``{name: dir}``)."""
        await asyncio.to_thread(_sync_adapters, self.registry, config.get("adapters", {}))

    def __del__(self) -> None:
        registry = getattr(self, "registry", None)
        if registry is not None:
            registry.close()


def _model_registry(options: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    from ..executor_ref import ExecutorRef
    from ..serving import ModelRegistry

    executor = ExecutorRef(options["executor"], **({"token": options["token"]} if options["token"] else {}))
    return ModelRegistry(
        executor,
        AutoTokenizer.from_pretrained(options["tokenizer"]),
        base_name=options["base_name"],
        device=options["device"],
        embeddings=options["embeddings"],
        **options["engine"],
    )


def _checked_engine_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` if ``Engine`` takes every one of them; ``ValueError`` naming those it does not."""
    from ..serving.engine import Engine

    accepted = {name for name, p in inspect.signature(Engine).parameters.items() if p.kind is p.KEYWORD_ONLY} - {"eos_ids", "base_name"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown engine options {unknown}: the serving engine takes {sorted(accepted)}")
    return dict(options)


def _sync_adapters(registry: Any, wanted: Mapping[str, str]) -> None:
    served = {m.name: m.adapter for m in registry.models() if m.adapter is not None}
    for name, path in served.items():
        if name not in wanted or Path(wanted[name]) != path:
            registry.unload(name)
    for name, path in wanted.items():
        if name not in served or Path(path) != served[name]:
            registry.load_adapter(name, path)


def serve_openai(
    app_name: str,
    *,
    executor: str | Sequence[str],
    tokenizer: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    memory: int | None = None,
    base_name: str = "base",
    engine_options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    embeddings: str = "client",
    token: str | None = None,
    api_key: str | None = None,
    admin_token: str | None = None,
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
    route_prefix: str = "/",
    proxy_location: str | None = None,
    address: str | None = None,
) -> str:
    """Deploy (or update) Serve application ``app_name`` with ``replicas`` replicas of the
    OpenAI-compatible server over ``executor`` (a ``symbiosis+ray://NAME`` or ``symbiosis://``
    address, or a list of addresses) and return its base URL (``.../v1``). ``engine_options``
    configure each replica's serving engine as ``serve-openai``'s options do (``max_seqs``,
    ``max_step_tokens``, ``kv_cache_bytes``, ``block_size``, ``max_adapters``). ``http_host``,
    ``http_port`` and ``proxy_location`` configure Serve's proxies when this starts Serve on the
    cluster (Serve keeps them while it runs). Deploying again with other ``adapters`` reloads
    only the adapters, on every replica."""
    init_ray(address)
    serve.start(http_options={"host": http_host, "port": http_port}, **({"proxy_location": proxy_location} if proxy_location else {}))
    options = dict(
        executor=list(executor) if not isinstance(executor, str) else executor,
        tokenizer=str(Path(tokenizer).resolve()),
        base_name=base_name,
        engine=_checked_engine_options(engine_options or {}),
        device=device,
        embeddings=embeddings,
        token=token,
        api_key=api_key,
        admin_token=admin_token,
    )
    actor_options = {"num_cpus": num_cpus, "num_gpus": num_gpus, **({"memory": memory} if memory else {})}
    deployment = OpenAIServer.options(
        name=app_name,
        num_replicas=replicas,
        ray_actor_options=actor_options,
        user_config={"adapters": {name: str(Path(path).resolve()) for name, path in (adapters or {}).items()}},
    )
    serve.run(deployment.bind(options), name=app_name, route_prefix=route_prefix)
    host = f"[{http_host}]" if ":" in http_host else http_host
    return f"http://{host}:{http_port}{route_prefix.rstrip('/')}/v1"


def delete_openai(app_name: str, *, address: str | None = None) -> None:
    """Remove Serve application ``app_name`` (Serve itself keeps running)."""
    init_ray(address)
    serve.delete(app_name)
