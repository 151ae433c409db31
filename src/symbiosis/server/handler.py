"""One op call, from wire message to output tensor: decode, admit, run, account.

Shared by the gRPC session streams and the shared-memory channels, so that both paths enforce the
same validation and tenant limits and count requests the same way.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter, defaultdict

import torch

from ..executor import BaseExecutor
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


class RequestHandler:
    """Runs op calls for tenants on one executor and counts completed requests per client id (at
    most ``MAX_CLIENT_IDS`` ids per tenant; requests of later ids count under ``OTHER_CLIENTS``)."""

    def __init__(self, executor: BaseExecutor, metrics: ServerMetrics) -> None:
        self.executor = executor
        self.metrics = metrics
        self._lock = threading.Lock()
        self._completed: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def handle(self, call: pb.OpCall, tenant: TenantState, regions: RegionReader | None = None) -> torch.Tensor:
        """The output of ``call`` for ``tenant``; raises a ``SymbiosisError`` for a refused request.

        The tenant's priority is added to the request's; its limits are checked before the
        request reaches the executor, and its in-flight slot is held until the result is ready.
        """
        start = time.perf_counter()
        outcome = "ok"
        try:
            request = decode_call(call, tenant=tenant.name, regions=regions)
            tenant.check_request(request.rows, request.x.numel() * request.x.element_size())
            request.priority = min(MAX_PRIORITY, request.priority + tenant.tenant.priority)
            with tenant.admit():
                y = self.executor.run(request)
            with self._lock:
                counts = self._completed[tenant.name]
                known = request.client_id in counts or len(counts) < MAX_CLIENT_IDS
                counts[request.client_id if known else OTHER_CLIENTS] += 1
            return y
        except Exception as exc:
            outcome = status_code_of(exc).name
            raise
        finally:
            self.metrics.observe(tenant.name, call.op, call.direction, outcome, time.perf_counter() - start)

    def completed_by_client(self, tenant: str) -> dict[str, int]:
        """Requests of ``tenant`` answered successfully, per client id."""
        with self._lock:
            return dict(self._completed.get(tenant, {}))
