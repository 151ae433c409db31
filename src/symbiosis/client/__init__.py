"""The client side of the split: a transformers model whose frozen base ops are proxies."""

from .memory import resident_bytes
from .model import load_model
from .phantom import PhantomWeight

__all__ = ["PhantomWeight", "load_model", "resident_bytes"]
