"""A fine-tuning job's settings, and the fingerprint that decides whether a checkpoint can be resumed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peft import PeftConfig

from .data import LossOn

#: Settings that may differ between a job and its resumption: they do not change the result (data
#: files count by their content, not their paths).
RESUMABLE_CHANGES = frozenset({"data", "eval_data", "output", "save_every", "eval_every", "keep_checkpoints"})


@dataclass
class FineTuneConfig:
    """Settings of one job. Steps are optimizer steps; each takes ``grad_accum`` micro-batches.

    ``max_length`` defaults to the model's context length (less virtual tokens), at most 1024.
    ``max_steps`` (when set) overrides ``epochs``. Evaluation runs every ``eval_every`` steps
    (default: with every checkpoint) and at the end; the eval set is ``eval_data`` or, without
    it, ``eval_fraction`` of the training examples (seeded split; none when the data has fewer
    than two examples). ``keep_checkpoints`` <= 0 keeps all of them.
    """

    data: list[Path]
    output: Path
    peft: PeftConfig
    eval_data: list[Path] = field(default_factory=list)
    eval_fraction: float = 0.1
    max_length: int | None = None
    loss_on: LossOn = "completion"
    truncate: bool = False
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    save_every: int = 100
    eval_every: int | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None

    def __post_init__(self) -> None:
        self.data = [Path(p) for p in self.data]
        self.eval_data = [Path(p) for p in self.eval_data]
        self.output = Path(self.output)
        positive = {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size, "grad_accum": self.grad_accum, "max_length": self.max_length or 1, "save_every": self.save_every}
        bad = [name for name, value in positive.items() if value < 1]
        if bad or self.epochs <= 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError(f"must be positive: {', '.join(bad) or 'epochs / max_steps'}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError("eval_fraction must lie in [0, 1)")

    def fingerprint(self) -> dict[str, Any]:
        """Every setting that shapes the result, plus a hash of each data file's content."""
        values: dict[str, Any] = {}
        for f in fields(self):
            if f.name in RESUMABLE_CHANGES:
                continue
            value = getattr(self, f.name)
            if f.name == "peft":
                value = {k: v for k, v in value.to_dict().items() if k not in ("base_model_name_or_path", "revision", "peft_version")}
            values[f.name] = value
        values["data_sha256"] = [_sha256(p) for p in self.data + self.eval_data]
        return _jsonable(values)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Sets as sorted lists, enums and paths as strings: what survives a JSON round trip unchanged."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
