"""The executor side of the split: frozen base ops, batched across clients."""

from .executor import BaseExecutor
from .stats import BatchStats

__all__ = ["BaseExecutor", "BatchStats"]
