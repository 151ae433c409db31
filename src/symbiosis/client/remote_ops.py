"""Client-side handles of executor ops, as autograd functions.

The backward of a frozen linear op needs only ``grad_x = grad_y·W``: no saved activation and no
weight gradient, so the executor stays stateless. Ops that consume the same input (q/k/v,
gate/up) travel as one fused request when the client really does feed them the same tensor.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from ..protocol import Direction, OpInfo
from .session import ClientSession


class RemoteLinear:
    """One linear op (single or fused) of the executor, callable on ``[..., in_features]`` tensors.

    The autograd functions work on 2-D rows and return fresh tensors; reshaping happens outside
    them, so callers (e.g. AdaLoRA's ``result += ...``) may update outputs in place. Under
    ``torch.autocast`` the rows are cast to the autocast dtype (recorded by autograd, as autocast
    casts a module's input) and the executor computes the product in that dtype, weight included:
    exactly what ``F.linear`` computes under autocast on a monolithic model.
    """

    def __init__(self, session: ClientSession, info: OpInfo) -> None:
        self.session = session
        self.info = info

    def call(
        self,
        direction: Direction,
        rows: torch.Tensor,
        priority: int,
        compute_dtype: torch.dtype | None = None,
        features: tuple[int, int] | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Forward ``rows·Wᵀ`` or backward ``rows·W`` for 2-D ``rows`` (see ``OpRequest`` for the options)."""
        if rows.shape[0] == 0:
            return rows.new_zeros(0, self.info.output_width(direction, features))
        return self.session.run(
            self.info.name, direction, rows, priority, compute_dtype=compute_dtype, features=features, weight_dtype=weight_dtype
        )

    @torch.compiler.disable
    def product(
        self, direction: Direction, rows: torch.Tensor, features: tuple[int, int] | None, weight_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """A product that client code computes with the weight itself (``PhantomWeight``), in ``rows``'s dtype.

        Autograd differentiates it above this call, so no autograd function is needed here;
        ``torch.compile`` does not trace into it (a request is a graph break).
        """
        return self.call(direction, rows, self.session.request_priority(direction), rows.dtype, features, weight_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        priority = self.session.request_priority(Direction.FORWARD)
        rows, compute = _autocast_rows(x)
        if _needs_graph(rows):
            y = _LinearFunction.apply(rows, self, priority, compute)
        else:
            y = self.call(Direction.FORWARD, rows, priority, compute)
        return y.view(*x.shape[:-1], y.shape[-1])

    def fused_call(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of every member of a fused op, each shaped ``[..., member_width]``."""
        priority = self.session.request_priority(Direction.FORWARD)
        rows = x.reshape(-1, x.shape[-1])
        compute = _autocast_dtype(rows)
        if _needs_graph(rows):
            outputs = _FusedLinearFunction.apply(rows, self, priority, compute)
        else:
            outputs = _member_outputs(self.call(Direction.FORWARD, _cast(rows, compute), priority, compute), self.info.member_widths)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives a linear op on ``x``'s device now; None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _cast(rows: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return rows if dtype is None else rows.to(dtype)


def _autocast_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
    """``x`` as 2-D rows, cast to the autocast dtype when autocast is on for its device, and that dtype."""
    rows = x.reshape(-1, x.shape[-1])
    compute = _autocast_dtype(rows)
    return _cast(rows, compute), compute


def _needs_graph(rows: torch.Tensor) -> bool:
    """Whether autograd must record the op: only then is the (costlier) autograd function used.

    Without it (inference, or inputs that need no gradient) the result is the same tensor.
    """
    return torch.is_grad_enabled() and rows.requires_grad


def _member_outputs(y: torch.Tensor, widths: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """A fused output split per member into separate tensors, so that an in-place update of one
    member's output cannot touch another's (nor its autograd version counter)."""
    return tuple(part.clone(memory_format=torch.contiguous_format) for part in y.split(widths, dim=-1))


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, op: RemoteLinear, priority: int, compute: torch.dtype | None) -> torch.Tensor:
        _save_backward(ctx, op, compute)
        return op.call(Direction.FORWARD, rows, priority, compute)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.op.call(Direction.BACKWARD, grad.contiguous(), ctx.backward_priority, ctx.compute), None, None, None


class _FusedLinearFunction(torch.autograd.Function):
    """Forward returns one tensor per member; backward sends the members' gradients as one request.

    Under autocast (``compute`` set) the rows are cast inside, and the backward multiplies each
    member's gradient by its own rows of the fused weight and sums the results in the rows' dtype:
    what the monolithic model's separate, separately cast members compute (one fused backward GEMM
    would round the sum once, in the autocast dtype, and differ from it at that dtype's precision).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, op: RemoteLinear, priority: int, compute: torch.dtype | None):
        _save_backward(ctx, op, compute)
        ctx.rows_dtype = rows.dtype
        return _member_outputs(op.call(Direction.FORWARD, _cast(rows, compute), priority, compute), op.info.member_widths)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        op = ctx.op
        if ctx.compute is None:
            return op.call(Direction.BACKWARD, torch.cat(grads, dim=-1), ctx.backward_priority), None, None, None
        total, start = None, 0
        for grad, width in zip(grads, op.info.member_widths, strict=True):
            part = op.call(Direction.BACKWARD, grad.contiguous(), ctx.backward_priority, ctx.compute, (start, start + width))
            part = part.to(ctx.rows_dtype)
            total = part if total is None else total + part
            start += width
        return total, None, None, None


def _save_backward(ctx, op: RemoteLinear, compute: torch.dtype | None) -> None:
    """Keep what the backward request needs: the op, its compute dtype, and the session's priority
    for backward passes."""
    ctx.op = op
    ctx.compute = compute
    ctx.backward_priority = op.session.request_priority(Direction.BACKWARD)


@dataclass
class _Pending:
    """Outputs computed for members not yet called, valid only for the exact input tensor."""

    source: weakref.ref
    version: int
    outputs: dict[str, torch.Tensor]

    def matches(self, x: torch.Tensor) -> bool:
        return self.source() is x and x._version == self.version


class FusionGroup:
    """Client-side state of a fused op (e.g. q/k/v): speculative fusion that checks itself.

    When the leader (the member called first) runs, all members' outputs are computed in one
    request and the others are kept for the members' own calls. A member called with a different
    tensor (e.g. an adapter that transforms its input) or never called switches fusion off for
    this client; results are exact either way.
    """

    def __init__(self, fused: RemoteLinear) -> None:
        self.fused = fused
        self.members = fused.info.members
        self.enabled = True
        self._local = threading.local()

    def leader_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """The leader's output with the others' kept for later, or None when fusion is off."""
        if getattr(self._local, "pending", None) is not None:
            self.enabled = False  # a member was never called with the leader's input
            self._local.pending = None
        if not self.enabled:
            return None
        outputs = self.fused.fused_call(x)
        self._local.pending = _Pending(weakref.ref(x), x._version, dict(zip(self.members[1:], outputs[1:])))
        return outputs[0]

    def member_call(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The output kept for ``name`` if it was computed from this very ``x``, else None."""
        pending: _Pending | None = getattr(self._local, "pending", None)
        if pending is None:
            return None
        if not pending.matches(x) or name not in pending.outputs:
            self.enabled = False
            self._local.pending = None
            return None
        output = pending.outputs.pop(name)
        if not pending.outputs:
            self._local.pending = None
        return output
