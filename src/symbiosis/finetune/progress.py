"""What a running job shows and records: a progress bar and a JSONL log of every step.

The log (``log.jsonl`` in the output directory) has one object per optimizer step (step, epoch,
loss, lr, tokens, step_s, tokens_per_s, time) and one per evaluation (step, eval_loss, time). A resumed job first cuts the log back to its checkpoint's step, so every step appears
exactly once however often the job was interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class TrainingLog:
    """Append-only JSONL records of a job; ``rewind(step)`` drops records after ``step``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rewind(self, step: int) -> None:
        """Keep only records of steps <= ``step`` (and nothing when ``step`` is 0)."""
        kept = [r for r in self.records() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every complete record (a line cut short by a crash is ignored)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, eval loss, tokens/s and learning rate (ETA is tqdm's)."""

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self._bar = tqdm(total=total, initial=initial, unit="step", desc="fine-tuning", file=sys.stderr, disable=not enabled, dynamic_ncols=True)
        self._fields: dict[str, str] = {}
        self._tokens = 0
        self._start = time.perf_counter()

    def step(self, *, loss: float, tokens: int, lr: float) -> float:
        """Advance one step; return the mean tokens/s since this bar started."""
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        self._fields.update(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", lr=f"{lr:.2e}")
        self._bar.set_postfix(self._fields, refresh=False)
        self._bar.update(1)
        return rate

    def eval_loss(self, value: float) -> None:
        self._fields["eval_loss"] = f"{value:.4f}"
        self._bar.set_postfix(self._fields)

    def write(self, message: str) -> None:
        """A line above the bar."""
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
