"""The models a server offers: the base model and adapters of any PEFT method, changed at run time.

Every served model is its own client of the shared executor (``load_model`` at inference
priority) with its own engine; an adapter is a PEFT directory loaded with ``PeftModel.from_pretrained``
onto a fresh client. Unloading stops new requests at once and lets running ones finish.
"""

from __future__ import annotations

import copy
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import SymbiosisError
from ..executor_ref import ExecutorRef
from .engine import Engine

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
    """A model the server offers; ``adapter`` is its PEFT directory (None for the base)."""

    name: str
    engine: Engine
    adapter: Path | None
    peft_type: str | None
    virtual_tokens: int
    created: int


class ModelRegistry:
    """The base model (always served, as ``base_name``) and the adapters loaded so far.

    ``embeddings="executor"`` keeps the token-embedding table on the executor instead of one copy
    per served model (the executor then sees token ids); see ``load_model``.
    """

    def __init__(
        self,
        executor: ExecutorRef,
        tokenizer: PreTrainedTokenizerBase,
        *,
        base_name: str,
        max_rows: int = 32,
        device: str = "cpu",
        embeddings: str = "client",
    ) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_rows = max_rows
        self.device = device
        self.embeddings = embeddings
        self._lock = threading.Lock()
        self._models: dict[str, ServedModel] = {}
        base = self._client(base_name)
        self.context_length = int(getattr(base.config, "max_position_embeddings", 0)) or None
        self._models[base_name] = self._serve(base_name, base, None)

    def _client(self, name: str) -> PreTrainedModel:
        client_id = f"openai:{name}:{uuid.uuid4().hex[:6]}"
        return self.executor.load_client(priority="inference", device=self.device, embeddings=self.embeddings, client_id=client_id)

    def _serve(self, name: str, model: PreTrainedModel, adapter: Path | None) -> ServedModel:
        eos = model.generation_config.eos_token_id
        eos_ids = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), self.tokenizer.eos_token_id} - {None}
        config = model.active_peft_config if isinstance(model, PeftModel) else None
        return ServedModel(
            name=name,
            engine=Engine(name, model, copy.deepcopy(self.tokenizer), eos_ids=eos_ids, max_rows=self.max_rows),
            adapter=adapter,
            peft_type=str(config.peft_type.value) if config is not None else None,
            virtual_tokens=config.num_virtual_tokens if config is not None and config.is_prompt_learning else 0,
            created=int(time.time()),
        )

    def load_adapter(self, name: str, path: str | Path) -> ServedModel:
        """Serve the PEFT adapter in directory ``path`` as ``name``.

        Raises ``ValueError`` for a bad name or an unloadable adapter, ``ModelConflictError`` if
        the name is taken.
        """
        if not _NAME.match(name):
            raise ValueError(f"invalid adapter name {name!r}: use letters, digits and . _ : - (at most 128 characters)")
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        self._check_free(name)
        try:
            model = PeftModel.from_pretrained(self._client(name), path)
        except Exception as exc:  # PEFT's own message says what does not fit
            raise ValueError(f"cannot load the adapter in {path}: {exc}") from exc
        served = self._serve(name, model, path)
        with self._lock:
            if name in self._models:  # loaded concurrently under the same name
                served.engine.close(cancel=True)
                raise ModelConflictError(f"an adapter named {name!r} is already loaded")
            self._models[name] = served
        return served

    def _check_free(self, name: str) -> None:
        with self._lock:
            if name in self._models:
                raise ModelConflictError(f"an adapter named {name!r} is already loaded")

    def unload(self, name: str) -> ServedModel:
        """Stop serving adapter ``name``: new requests fail at once, running ones finish."""
        with self._lock:
            if name == self.base_name:
                raise ModelConflictError("the base model cannot be unloaded")
            served = self._models.pop(name, None)
        if served is None:
            raise UnknownModelError(name)
        served.engine.close()
        return served

    def get(self, name: str) -> ServedModel:
        with self._lock:
            served = self._models.get(name)
        if served is None:
            raise UnknownModelError(name)
        return served

    def models(self) -> list[ServedModel]:
        """The base model first, then the adapters in the order they were loaded."""
        with self._lock:
            return list(self._models.values())

    def close(self) -> None:
        """Cancel everything and stop every engine."""
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for served in models:
            served.engine.close(cancel=True)
        for served in models:
            served.engine.join(timeout=10)
