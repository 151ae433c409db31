"""Adapters in the serving engine: reading and loading PEFT directories, keeping a bounded set
resident, and applying each adapter's PEFT layers to its own rows of a shared forward."""

from .layer import RowDispatch, Side
from .loader import AdapterError, AdapterInfo, LoadedAdapter, load_adapter, read_adapter
from .store import AdapterLoadError, AdapterStore

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "AdapterLoadError",
    "AdapterStore",
    "LoadedAdapter",
    "RowDispatch",
    "Side",
    "load_adapter",
    "read_adapter",
]
