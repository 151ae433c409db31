"""Which executor a tool's clients attach to: one built in this process, or ``symbiosis://`` addresses.

Fine-tuning jobs and the OpenAI server never build clients any other way, so the choice between an
in-process executor and a remote (possibly sharded) one is made here, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from .client import load_model
from .executor import BaseExecutor


class ExecutorRef:
    """What ``load_model`` attaches clients to, plus the options every client of it needs.

    ``target`` is a ``BaseExecutor`` (or another ``Transport``) in this process, one
    ``symbiosis://host:port`` address, or several addresses of a sharded base; ``client_options``
    (e.g. ``token``) are passed to every ``load_model`` call.
    """

    def __init__(self, target: Any, **client_options: Any) -> None:
        self.target = target
        self.client_options = client_options

    @classmethod
    def open(
        cls,
        *,
        model_dir: str | Path | None = None,
        addresses: Sequence[str] = (),
        token: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        **executor_options: Any,
    ) -> ExecutorRef:
        """Remote ``addresses`` when given (with ``token``), else an in-process executor of ``model_dir``."""
        if addresses:
            if executor_options:
                raise ValueError(f"executor options {sorted(executor_options)} apply only to an in-process executor")
            target = addresses[0] if len(addresses) == 1 else list(addresses)
            return cls(target, **({"token": token} if token else {}))
        if model_dir is None:
            raise ValueError("give a local model directory or at least one symbiosis:// executor address")
        return cls(BaseExecutor.from_pretrained(model_dir, dtype=dtype, device=device, **executor_options))

    @property
    def local_executor(self) -> BaseExecutor | None:
        """The executor when it runs in this process (its batch statistics are then readable), else None."""
        return self.target if isinstance(self.target, BaseExecutor) else None

    def load_client(self, **options: Any) -> PreTrainedModel:
        """A new, independent client model of this executor (``load_model`` options as keywords)."""
        return load_model(self.target, **self.client_options, **options)
