"""Symbiosis: one frozen base LLM shared by many PEFT clients that fine-tune and generate at once."""

from .client import load_model
from .errors import BadRequestError, BaseWeightAccessError, SymbiosisError, UnsupportedFeatureError
from .executor import BaseExecutor

__all__ = [
    "BadRequestError",
    "BaseExecutor",
    "BaseWeightAccessError",
    "SymbiosisError",
    "UnsupportedFeatureError",
    "load_model",
]
