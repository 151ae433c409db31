"""An OpenAI-compatible multi-adapter server on the client side of the split (FastAPI + uvicorn):
one engine per served base steps every adapter's requests in one forward."""

from .adapters import AdapterError, AdapterInfo, read_adapter
from .app import create_app
from .engine import Engine, EngineClosed, EngineStats, Event, GenerationRequest, eos_token_ids
from .http import HttpServer
from .registry import ModelConflictError, ModelRegistry, ServedModel, UnknownModelError
from .sampling import SamplingParams, TokenLogprob

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "Engine",
    "EngineClosed",
    "EngineStats",
    "Event",
    "GenerationRequest",
    "HttpServer",
    "ModelConflictError",
    "ModelRegistry",
    "SamplingParams",
    "ServedModel",
    "TokenLogprob",
    "UnknownModelError",
    "create_app",
    "eos_token_ids",
    "read_adapter",
]
