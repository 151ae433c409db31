"""The client side of the split: a transformers model whose frozen base ops are proxies."""

from .memory import resident_bytes
from .model import load_model
from .parallel import base_weight_names, base_weights
from .phantom import PhantomWeight

__all__ = ["PhantomWeight", "base_weight_names", "base_weights", "load_model", "resident_bytes"]
