"""One op call, from wire message to output tensor: decode, admit, run, account.

Shared by the gRPC session streams and the channels (shared memory, TCP), so that every path
enforces the same validation and tenant limits and counts requests the same way.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..executor import BaseExecutor
from ..executor.executor import OutputBuffer
from ..executor.scheduler import Completion
from ..protocol import OpRequest
from ..transport import symbiosis_pb2 as pb
from ..transport.wire import MAX_PRIORITY, RegionReader, decode_call, status_code_of
from .metrics import ServerMetrics
from .tenancy import TenantState

# Request tensors are read-only views of the received message bytes (no copy); the executor never
# writes into its inputs, so torch's warning about non-writable buffers does not apply here.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

#: Distinct client ids counted per tenant (client ids are chosen by clients: memory must stay bounded).
MAX_CLIENT_IDS = 1024
#: The id under which a tenant's requests from further client ids are counted.
OTHER_CLIENTS = "other"


@dataclass(slots=True)
class CallPlan:
    """A channel's call decoded, checked against the tenant's size limits and validated once, to be
    run again whenever the same call comes back: its rows are a view of the channel's request
    memory (fresh values each time) and its output goes to ``out`` (see ``RequestHandler.plan``)."""

    call: pb.OpCall
    request: OpRequest
    out: torch.Tensor
    #: What the channel sends back for a computed call besides its call id (see ``Channel``).
    answer: bytes = b""


class RequestHandler:
    """Runs op calls for tenants on one executor and counts completed requests per client id (at
    most ``MAX_CLIENT_IDS`` ids per tenant; requests of later ids count under ``OTHER_CLIENTS``).

    The tenant's priority is added to each request's; its limits are checked before the request
    reaches the executor, and its in-flight slot is held until the result is ready. ``submit``
    (channels) hands the request over and returns; ``handle`` (gRPC streams) waits for it.
    """

    def __init__(self, executor: BaseExecutor, metrics: ServerMetrics) -> None:
        self.executor = executor
        self.metrics = metrics
        self._lock = threading.Lock()
        self._completed: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def handle(self, call: pb.OpCall, tenant: TenantState, regions: RegionReader | None = None) -> torch.Tensor:
        """The output of ``call`` for ``tenant``; raises a ``SymbiosisError`` for a refused request."""
        start = time.perf_counter()
        request = self._admitted(call, tenant, regions, start)
        try:
            y = self.executor.run(request)
        except Exception as exc:
            self._finish(call, tenant, request, start, exc)
            raise
        self._finish(call, tenant, request, start, None)
        return y

    def submit(
        self,
        call: pb.OpCall,
        tenant: TenantState,
        reply: Completion,
        *,
        regions: RegionReader | None = None,
        out: OutputBuffer | None = None,
        plan: CallPlan | None = None,
    ) -> None:
        """Hand ``call`` to the executor; ``reply(output, error)`` is called once it is answered (or
        refused), by whichever thread computed it — possibly this one, before ``submit`` returns.
        ``out``: where the output is to be written (see ``BaseExecutor.submit``); ``plan``: the
        call's ``CallPlan`` (``run``), whose request is already decoded and checked."""
        start = time.perf_counter()
        try:
            request = self._admitted(call, tenant, regions, start, plan)
        except Exception as exc:
            reply(None, exc)
            return

        def done(y: torch.Tensor | None, error: BaseException | None) -> None:
            self._finish(call, tenant, request, start, error)
            reply(y, error)

        try:
            self.executor.submit(request, done, out=out, validated=plan is not None)
        except Exception as exc:  # e.g. the executor closed
            done(None, exc)

    def plan(
        self,
        call: pb.OpCall,
        tenant: TenantState,
        regions: RegionReader,
        output: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
    ) -> CallPlan | None:
        """``call`` as a ``CallPlan``, or None when it must be decoded afresh each time (token ids:
        their values are validated per call). Raises (and counts) what ``submit`` would refuse for
        good: a malformed call, one beyond the tenant's size limits, one the executor refuses."""
        start = time.perf_counter()
        try:
            request = self._decoded(call, tenant, regions)
            if not request.x.is_floating_point():
                return None
            shape, dtype = self.executor.validate(request)
            out = output(shape, dtype)
        except Exception as exc:
            self._count_refusal(call, tenant, start, exc)
            raise
        return CallPlan(call, request, out)

    def run(self, plan: CallPlan, tenant: TenantState, reply: Completion) -> None:
        """Hand a planned call to the executor as ``submit`` does (the tenant's rate and in-flight
        limits are checked each time; nothing else needs to be)."""
        self.submit(plan.call, tenant, reply, out=plan.out, plan=plan)

    def _admitted(
        self, call: pb.OpCall, tenant: TenantState, regions: RegionReader | None, start: float, plan: CallPlan | None = None
    ) -> OpRequest:
        """The request ``call`` describes (``plan``'s, already decoded and checked, if given), within
        the tenant's limits and holding one of its in-flight slots; a refusal is counted and raised."""
        try:
            request = plan.request if plan is not None else self._decoded(call, tenant, regions)
            tenant.acquire()
        except Exception as exc:
            self._count_refusal(call, tenant, start, exc)
            raise
        return request

    def _count_refusal(self, call: pb.OpCall, tenant: TenantState, start: float, exc: BaseException) -> None:
        self.metrics.observe(tenant.name, call.op, call.direction, status_code_of(exc).name, time.perf_counter() - start)

    @staticmethod
    def _decoded(call: pb.OpCall, tenant: TenantState, regions: RegionReader | None) -> OpRequest:
        """The request ``call`` describes, within the tenant's size limits, at the tenant's priority."""
        request = decode_call(call, tenant=tenant.name, regions=regions)
        tenant.check_request(request.rows, request.x.numel() * request.x.element_size())
        request.priority = min(MAX_PRIORITY, request.priority + tenant.tenant.priority)
        return request

    def _finish(self, call: pb.OpCall, tenant: TenantState, request: OpRequest, start: float, error: BaseException | None) -> None:
        """Release the request's slot and account its outcome."""
        tenant.release()
        if error is None:
            with self._lock:
                counts = self._completed[tenant.name]
                known = request.client_id in counts or len(counts) < MAX_CLIENT_IDS
                counts[request.client_id if known else OTHER_CLIENTS] += 1
        outcome = "ok" if error is None else status_code_of(error).name
        self.metrics.observe(tenant.name, call.op, call.direction, outcome, time.perf_counter() - start)

    def completed_by_client(self, tenant: str) -> dict[str, int]:
        """Requests of ``tenant`` answered successfully, per client id."""
        with self._lock:
            return dict(self._completed.get(tenant, {}))
