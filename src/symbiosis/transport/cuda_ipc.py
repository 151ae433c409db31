"""GPU clients of a GPU executor without host copies: a channel's buffers in the executor's GPU memory.

A same-host client that computes on a CUDA device asks for them when it attaches its channel. The
executor allocates a request and a response buffer on its GPU and two interprocess CUDA events, and
shares them once, with the channel's memory (``ChannelGrant``): the IPC handles of the buffers'
allocations (``UntypedStorage._share_cuda_()``, what ``torch.multiprocessing`` sends, here as
protobuf fields instead of a pickle) and of the events (``torch.cuda.Event.ipc_handle()``). A call:

1. the client copies its rows into the request buffer on its current stream — on the executor's
   GPU an on-device copy, from another GPU of the host a peer copy — and records ``client_event``;
2. it sends the ``OpCall`` (a ``ShmRegion`` with ``device`` set) over the channel's socket;
3. the executor makes its stream wait for ``client_event``, computes straight into the response
   buffer, records ``server_event`` and answers;
4. the client's stream waits for ``server_event`` and copies the output out of the response buffer.

No byte goes through host memory and no side blocks on the other's GPU work (the executor still
synchronises once per batch when it checks forward inputs for NaN/Inf). A client whose GPU cannot
open the executor's memory (another host, no peer access, a GPU it does not see) keeps the channel's
host memory, which a GPU executor registers as pinned memory (``cudaHostRegister``) so that its
copies to and from the GPU are DMA transfers at full speed; so does a GPU client of a CPU executor.

Untested on hardware so far: no GPU was lent while this was written (``tests/symbiosis/test_gpu.py``
covers it where one is).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import symbiosis_pb2 as pb

log = logging.getLogger(__name__)


def available() -> bool:
    """Whether this process can use CUDA at all (without initialising it when it cannot)."""
    return torch.cuda.is_available()


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID: the same in every process, whatever its ``CUDA_VISIBLE_DEVICES`` numbering."""
    return str(torch.cuda.get_device_properties(device).uuid)


def local_device(uuid: str) -> torch.device | None:
    """This process's ``cuda:i`` for the GPU with ``uuid``, or None when this process does not see it."""
    for index in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", index)) == uuid:
            return torch.device("cuda", index)
    return None


def pin(memory: torch.Tensor) -> Callable[[], None]:
    """Register the host memory of ``memory`` (e.g. a channel's shared mapping) as pinned, so copies
    between it and a GPU run by DMA; returns the function that unregisters it. Without CUDA, or if
    registering fails, nothing happens (copies still work, staged by the driver)."""
    if not available() or memory.numel() == 0:
        return lambda: None
    from torch.cuda._pin_memory_utils import pin_memory, unpin_memory

    pointer = memory.data_ptr()
    try:
        pin_memory(pointer, memory.numel() * memory.element_size())
    except RuntimeError as exc:
        log.info("could not pin a channel's memory (%s); host copies will be staged", exc)
        return lambda: None

    def unpin() -> None:
        with contextlib.suppress(AssertionError, RuntimeError):
            unpin_memory(pointer)

    return unpin


@dataclass
class CudaBuffers:
    """A channel's request and response buffers (uint8) on the executor's GPU and its two events,
    as the executor allocated them or as a client opened them."""

    device: torch.device
    request: torch.Tensor
    response: torch.Tensor
    client_event: torch.cuda.Event
    server_event: torch.cuda.Event

    @classmethod
    def allocate(cls, device: torch.device, capacity: int) -> CudaBuffers:
        """The executor's side: new buffers of ``capacity`` bytes each and events on ``device``."""
        with torch.cuda.device(device):
            return cls(
                device,
                torch.empty(capacity, dtype=torch.uint8, device=device),
                torch.empty(capacity, dtype=torch.uint8, device=device),
                torch.cuda.Event(interprocess=True),
                torch.cuda.Event(interprocess=True),
            )

    def grant(self) -> pb.CudaBuffers:
        """The IPC handles a client opens these buffers with."""
        return pb.CudaBuffers(
            device_uuid=device_uuid(self.device),
            request=_share(self.request),
            response=_share(self.response),
            client_event=self.client_event.ipc_handle(),
            server_event=self.server_event.ipc_handle(),
        )

    @classmethod
    def open(cls, grant: pb.CudaBuffers) -> CudaBuffers | None:
        """The client's side: the executor's buffers mapped into this process, or None when this
        process cannot open them (it does not see that GPU, or CUDA IPC fails); the channel then
        keeps to host memory."""
        device = local_device(grant.device_uuid) if available() else None
        if device is None:
            return None
        try:
            return cls(
                device,
                _open(grant.request, device),
                _open(grant.response, device),
                torch.cuda.Event.from_ipc_handle(device, grant.client_event),
                torch.cuda.Event.from_ipc_handle(device, grant.server_event),
            )
        except RuntimeError as exc:
            log.info("cannot open the executor's CUDA buffers (%s); the channel uses host memory", exc)
            return None

    # ------------------------------------------------------------------------------ the client
    def holds(self, x: torch.Tensor) -> bool:
        """Whether rows ``x`` can travel through these buffers (they are on a GPU)."""
        return x.is_cuda

    def send(self, x: torch.Tensor) -> None:
        """Copy rows ``x`` (on any CUDA device) into the request buffer and mark them ready."""
        nbytes = x.numel() * x.element_size()
        self.request[:nbytes].view(x.dtype).view(x.shape).copy_(x)
        self.client_event.record(torch.cuda.current_stream(self.device))

    def receive(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A copy on ``device`` of the output the executor wrote at ``offset`` of the response buffer."""
        torch.cuda.current_stream(self.device).wait_event(self.server_event)
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.copy_(self.response[offset : offset + nbytes].view(dtype).view(shape))

    # ---------------------------------------------------------------------------- the executor
    def await_request(self) -> None:
        """Make the executor's stream wait until the client's rows are in the request buffer."""
        torch.cuda.current_stream(self.device).wait_event(self.client_event)

    def mark_response(self) -> None:
        """Mark the output (computed on the executor's stream so far) ready for the client."""
        self.server_event.record(torch.cuda.current_stream(self.device))


def _share(buffer: torch.Tensor) -> pb.CudaStorage:
    handle, size, offset, counter, counter_offset, event, event_sync = buffer.untyped_storage()._share_cuda_()[1:]
    return pb.CudaStorage(
        handle=handle,
        size_bytes=size,
        offset_bytes=offset,
        ref_counter_handle=counter,
        ref_counter_offset=counter_offset,
        event_handle=event or b"",
        event_sync_required=event_sync,
    )


def _open(storage: pb.CudaStorage, device: torch.device) -> torch.Tensor:
    shared = torch.UntypedStorage._new_shared_cuda(
        device.index,
        storage.handle,
        storage.size_bytes,
        storage.offset_bytes,
        storage.ref_counter_handle,
        storage.ref_counter_offset,
        storage.event_handle or None,
        storage.event_sync_required,
    )
    return torch.empty(0, dtype=torch.uint8, device=device).set_(shared, 0, (storage.size_bytes,), (1,))
