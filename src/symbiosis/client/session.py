"""A client's identity and priority policy, and its one way of sending op requests."""

from __future__ import annotations

import uuid

import torch

from ..protocol import PRIORITY_INFERENCE, PRIORITY_TRAINING, Direction, OpRequest
from ..transport import Transport

_PRIORITY_NAMES = {"inference": PRIORITY_INFERENCE, "training": PRIORITY_TRAINING}


def resolve_priority(priority: int | str | None) -> int | None:
    """``"inference"`` -> 0, ``"training"`` -> 1, an int >= 0 as is, ``None``/``"auto"`` -> None."""
    if priority is None or priority == "auto":
        return None
    if isinstance(priority, str):
        if priority not in _PRIORITY_NAMES:
            raise ValueError(f"priority must be 'auto', 'inference', 'training' or an int >= 0, got {priority!r}")
        return _PRIORITY_NAMES[priority]
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise ValueError(f"priority must be an int >= 0, got {priority!r}")
    return priority


class ClientSession:
    """Sends a client's op requests over its transport, tagged with its id and priority.

    With ``priority=None`` (auto), forward passes without autograd (``generate()``, evaluation)
    are inference requests and everything that trains is a fine-tuning request.
    """

    def __init__(self, transport: Transport, *, client_id: str | None = None, priority: int | str | None = None) -> None:
        self.transport = transport
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self.priority = resolve_priority(priority)

    def request_priority(self, direction: Direction) -> int:
        """The priority of a request issued now: the client's own when it chose one, else by kind.

        Backward requests carry the client's priority too ("auto": training). Ask for a forward
        request's priority outside autograd functions (grad mode is off inside them).
        """
        if self.priority is not None:
            return self.priority
        if direction is Direction.FORWARD and not torch.is_grad_enabled():
            return PRIORITY_INFERENCE
        return PRIORITY_TRAINING

    def run(
        self,
        op: str,
        direction: Direction,
        x: torch.Tensor,
        priority: int,
        *,
        out_dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
        features: tuple[int, int] | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Execute one op on rows ``x`` (2-D, or 1-D token ids); see ``OpRequest`` for the options."""
        request = OpRequest(
            op,
            direction,
            x,
            client_id=self.client_id,
            priority=priority,
            out_dtype=out_dtype,
            compute_dtype=compute_dtype,
            features=features,
            weight_dtype=weight_dtype,
        )
        return self.transport.run(request)
