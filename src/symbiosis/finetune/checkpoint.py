"""Checkpoints that survive ``kill -9``: each is written to a temporary directory and renamed into place.

A checkpoint directory ``checkpoints/step-00000012`` holds the adapter in PEFT format
(``adapter_config.json``, ``adapter_model.safetensors``) and ``trainer_state.pt`` (optimizer,
LR scheduler, RNG states, step and data position). The rename is atomic, so a directory with a
step name is always complete; a job killed while writing leaves only a ``.tmp-*`` directory, which
the next run deletes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, load_peft_weights, set_peft_model_state_dict

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


@dataclass
class TrainerState:
    """Everything besides the adapter weights that a resumed job needs to continue exactly."""

    step: int
    micro_batch: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    python_rng: Any
    cuda_rng: list[torch.Tensor] | None = None

    @classmethod
    def capture(cls, step: int, micro_batch: int, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
        """The state of a job right after optimizer step ``step`` (RNG included)."""
        return cls(
            step=step,
            micro_batch=micro_batch,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            torch_rng=torch.get_rng_state(),
            python_rng=random.getstate(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        )

    def restore(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Put optimizer, scheduler and RNGs back into this state."""
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        torch.set_rng_state(self.torch_rng)
        random.setstate(self.python_rng)
        if self.cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda_rng)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save_checkpoint(root: Path, model: PeftModel, state: TrainerState, *, keep: int) -> Path:
    """Write a complete checkpoint of ``state.step`` atomically; keep only the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, state.step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(vars(state), tmp / STATE_FILE)
    _fsync_tree(tmp)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)


def remove_partial_checkpoints(root: Path) -> list[Path]:
    """Delete directories left by writes that never finished; return what was removed."""
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX)]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def load_checkpoint(path: Path, model: PeftModel) -> TrainerState:
    """Load the adapter weights of checkpoint ``path`` into ``model``; return its trainer state."""
    set_peft_model_state_dict(model, load_peft_weights(str(path), device=str(_device(model))))
    return TrainerState(**torch.load(path / STATE_FILE, weights_only=True))


def _device(model: PeftModel) -> torch.device:
    return next(p.device for p in model.parameters() if p.requires_grad)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(path)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or directory) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
