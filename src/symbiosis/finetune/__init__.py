"""Client-side fine-tuning jobs against a shared executor: data validation, the loop, checkpoints."""

from .config import FineTuneConfig
from .data import DataError, Example, load_examples
from .job import FineTuneJob, FineTuneResult, ResumeError
from .methods import METHODS, load_config_file, method_config

__all__ = [
    "METHODS",
    "DataError",
    "Example",
    "FineTuneConfig",
    "FineTuneJob",
    "FineTuneResult",
    "ResumeError",
    "load_config_file",
    "load_examples",
    "method_config",
]
