"""The models a server offers: the base model and any number of adapters of any PEFT method, all
served by one engine on one Symbiosis client of the shared executor, changed at run time.

``register_adapter`` reads an adapter's config (cheap; hundreds can be registered) and the engine
loads its weights when a request first needs them; ``load_adapter`` also loads them at once (so a
broken adapter is refused on the spot). Unloading stops new requests at once and lets queued and
running ones finish.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..errors import SymbiosisError
from ..executor_ref import ExecutorRef
from .adapters import AdapterError, AdapterInfo, read_adapter
from .engine import Engine, eos_token_ids

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class UnknownModelError(SymbiosisError, KeyError):
    """No served model has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"The model `{self.name}` does not exist."


class ModelConflictError(SymbiosisError):
    """An adapter name that is taken, or an operation the base model does not allow."""


@dataclass(frozen=True)
class ServedModel:
    """A model the server offers: the base (``adapter`` None) or a registered adapter."""

    name: str
    adapter: AdapterInfo | None
    created: int

    @property
    def path(self) -> Path | None:
        return self.adapter.path if self.adapter is not None else None

    @property
    def peft_type(self) -> str | None:
        return self.adapter.peft_type if self.adapter is not None else None

    @property
    def virtual_tokens(self) -> int:
        return self.adapter.virtual_tokens if self.adapter is not None else 0


class ModelRegistry:
    """The base model (always served, as ``base_name``) and the adapters registered so far.

    ``embeddings="executor"`` keeps the token-embedding table on the executor instead of on the
    server's client (the executor then sees token ids). Engine options (``max_seqs``,
    ``max_step_tokens``, ``kv_cache_bytes``, ``block_size``, ``max_adapters``) go to ``Engine``.
    """

    def __init__(
        self,
        executor: ExecutorRef,
        tokenizer: PreTrainedTokenizerBase,
        *,
        base_name: str,
        device: str = "cpu",
        embeddings: str = "client",
        **engine_options,
    ) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.base_name = base_name
        client_id = f"openai:{base_name}:{uuid.uuid4().hex[:6]}"
        model = executor.load_client(priority="inference", device=device, embeddings=embeddings, client_id=client_id)
        self.engine = Engine(model, tokenizer, eos_ids=eos_token_ids(model, tokenizer), base_name=base_name, **engine_options)
        self.context_length = self.engine.context_length
        self._lock = threading.Lock()
        self._base = ServedModel(base_name, None, int(time.time()))
        self._created: dict[str, int] = {}

    def register_adapter(self, name: str, path: str | Path) -> ServedModel:
        """Serve the PEFT adapter in directory ``path`` as ``name``, loaded when first needed.

        Raises ``ValueError`` for a bad name or a directory that is no servable adapter,
        ``ModelConflictError`` if the name is taken.
        """
        if not _NAME.match(name):
            raise ValueError(f"invalid adapter name {name!r}: use letters, digits and . _ : - (at most 128 characters)")
        if name == self.base_name:
            raise ModelConflictError(f"{name!r} is the base model's name")
        info = read_adapter(name, path)
        with self._lock:
            try:
                self.engine.adapters.register(info)
            except KeyError:
                raise ModelConflictError(f"an adapter named {name!r} is already loaded") from None
            self._created[name] = int(time.time())
        return self.get(name)

    def load_adapter(self, name: str, path: str | Path) -> ServedModel:
        """``register_adapter``, and load the weights now (a broken adapter raises ``ValueError``)."""
        served = self.register_adapter(name, path)
        try:
            loaded = self.engine.adapters.load(served.adapter)
        except AdapterError:
            self.unload(name)
            raise
        self.engine.adapters.offer(loaded)
        return served

    def unload(self, name: str) -> ServedModel:
        """Stop serving adapter ``name``: new requests fail at once, queued and running ones finish."""
        if name == self.base_name:
            raise ModelConflictError("the base model cannot be unloaded")
        served = self.get(name)
        self.engine.adapters.unregister(name)
        with self._lock:
            self._created.pop(name, None)
        return served

    def get(self, name: str) -> ServedModel:
        if name == self.base_name:
            return self._base
        info = self.engine.adapters.get(name)
        if info is None:
            raise UnknownModelError(name)
        with self._lock:
            return ServedModel(name, info, self._created.get(name, 0))

    def models(self) -> list[ServedModel]:
        """The base model first, then the adapters in the order they were registered."""
        with self._lock:
            created = dict(self._created)
        return [self._base, *(ServedModel(i.name, i, created.get(i.name, 0)) for i in self.engine.adapters.registered())]

    def close(self) -> None:
        """Cancel everything and stop the engine."""
        self.engine.close(cancel=True)
        self.engine.join(timeout=30)
