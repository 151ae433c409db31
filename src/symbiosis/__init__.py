"""Symbiosis: one frozen base LLM shared by many PEFT clients that fine-tune and generate at once."""

import logging

# bitsandbytes (the quantization extra; PEFT imports it) warns at import on AVX512-BF16 CPUs that it
# cannot fetch an optional CPU inference kernel from the Hugging Face hub; Symbiosis never uses it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
