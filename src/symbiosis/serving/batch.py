"""What one engine step computes, as the model's modules see it during that step's forward.

The engine packs the new tokens of every scheduled sequence into one row of the model's input
(``[1, N, hidden]``), the sequences of each adapter next to each other, and publishes a
``StepBatch`` for the duration of the forward: the attention function reads where each token's key
and value go and which keys each query sees; the adapter dispatch layers read which rows belong to
which adapter. Outside a step (``current()`` is None) modules behave as the plain base model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RowGroup:
    """Rows ``rows`` of the step's packed input belong to sequences of ``adapter`` (None: the bare base)."""

    adapter: Any
    rows: slice


@dataclass(frozen=True)
class StepBatch:
    """One step: adapter groups over the N packed token rows, the same over the rows whose logits
    the LM head computes, and the attention plan (``serving.attention``). ``lora_masks``: the step's
    LoRA row-scaling masks, built by the first module that needs each (``adapters/lora.py``)."""

    groups: tuple[RowGroup, ...]
    logit_groups: tuple[RowGroup, ...]
    attention: Any
    lora_masks: dict = field(default_factory=dict, compare=False, repr=False)


_local = threading.local()


def current() -> StepBatch | None:
    """The step whose forward runs on this thread, or None."""
    return getattr(_local, "batch", None)


@contextmanager
def active(batch: StepBatch) -> Iterator[StepBatch]:
    """Publish ``batch`` to the modules for the duration of a forward on this thread."""
    previous = current()
    _local.batch = batch
    try:
        yield batch
    finally:
        _local.batch = previous


def contiguous_groups(keys: list[Any]) -> tuple[RowGroup, ...]:
    """Runs of equal consecutive ``keys`` (one per row) as row groups."""
    groups, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] is not keys[start]:
            groups.append(RowGroup(keys[start], slice(start, i)))
            start = i
    return tuple(groups)
