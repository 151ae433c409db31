"""An OpenAI-compatible multi-adapter server on the client side of the split (FastAPI + uvicorn)."""

from .app import create_app
from .engine import Engine, EngineStats, Event, GenerationRequest
from .http import HttpServer
from .registry import ModelConflictError, ModelRegistry, ServedModel, UnknownModelError
from .sampling import SamplingParams

__all__ = [
    "Engine",
    "EngineStats",
    "Event",
    "GenerationRequest",
    "HttpServer",
    "ModelConflictError",
    "ModelRegistry",
    "SamplingParams",
    "ServedModel",
    "UnknownModelError",
    "create_app",
]
