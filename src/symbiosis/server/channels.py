"""What the server's two kinds of channels share: a bounded set of them, and the call loop.

A channel serves one client thread (shared memory: ``shm_host``; TCP: ``data_host``) and belongs
to one tenant. Its thread reads a call, hands it to the executor and goes back to reading only
once the call is answered — so a client has at most one call in flight per channel, and a hostile
one cannot queue more. The answer is written by whichever thread computed the call (the executor's
combiner writes straight into the channel's response memory and sends the result message): no
thread hand-off on the way back. A channel sees the same few calls again and again (one per op and
shape of its client's model): each is decoded, checked and validated the first time only and kept
as a ``CallPlan`` under the bytes that follow its call id; a repeat is then run at once. A channel
ends when its client hangs up, crashes or sends what it cannot answer, when idle longer than the
server's idle timeout, or when the server drains; a call in flight is answered first (or its
answer dropped if the client is gone), so nothing a dead client asked for outlives its channel.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable

import torch

from ..errors import BadRequestError, ExecutorUnavailableError, LimitExceededError
from ..transport import symbiosis_pb2 as pb
from ..transport.frames import FrameError
from ..transport.wire import RegionReader, describe_region, status_code_of
from .handler import CallPlan, RequestHandler
from .tenancy import TenantState

log = logging.getLogger(__name__)

#: Longest error message sent back.
MAX_ERROR_CHARS = 1024
#: Serialized output descriptions a channel keeps (see ``Channel._described``).
MAX_DESCRIPTIONS = 256
#: Call plans a channel keeps (beyond this many distinct calls it starts afresh).
MAX_PLANS = 256


#: The first byte of a serialized ``OpCall`` that starts with its call id (field 1, a varint).
_CALL_ID_TAG = 0x08


def call_id_end(message: bytes | memoryview) -> int:
    """Where the call id field that ``message`` starts with ends (as clients send an ``OpCall``: the
    call id, then a serialized description they keep per call); 0 when it starts otherwise. A
    varint's last byte is the first below 0x80; the field's value is never needed (a planned call's
    answer echoes these bytes, and a call decoded afresh is parsed whole by protobuf)."""
    if not message or message[0] != _CALL_ID_TAG:
        return 0
    for end in range(2, min(len(message), 11) + 1):
        if message[end - 1] < 0x80:
            return end
    return 0


def parse_call(message: bytes | memoryview) -> pb.OpCall:
    """The ``OpCall`` a message carries; ``BadRequestError`` when it is none."""
    call = pb.OpCall()
    try:
        call.ParseFromString(message)
    except Exception as exc:  # protobuf's DecodeError, or anything a malformed message provokes
        raise BadRequestError(f"malformed OpCall: {exc}") from None
    return call


class Channel(threading.Thread):
    """One client thread's channel. Subclasses set up the connection in ``run`` and then call
    ``serve``; they read calls (``receive``) and send results (``send``)."""

    def __init__(self, host: ChannelHost, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.host = host
        self.tenant: TenantState | None = None
        self.connected = False
        #: When the client connected or the last call was answered (``inf`` during a call).
        self.idle_since = time.monotonic()
        self._answered = threading.Lock()  # held while a call is in flight
        self._call_id = 0
        self._answer = b""  # the current call's answer besides its call id, when a plan has it
        self._lead = b""  # a planned call's serialized call id (as OpResult's: both are field 1), else b""
        self._descriptions: dict[tuple, bytes] = {}
        self._plans: dict[Hashable, CallPlan | None] = {}

    # ------------------------------------------------------------------------ for subclasses
    def receive(self) -> tuple[bytes | memoryview, RegionReader, Hashable] | None:
        """The next call's serialized ``OpCall`` (valid until the next receive), how to read its
        tensor, and what else must be equal for a repeat of the same call (e.g. a frame's payload
        length); None when the client hung up.

        Raises ``BadRequestError`` for a message that is no call (answered with an error, the
        channel goes on) and ``OSError`` when the connection broke (the channel ends).
        """
        raise NotImplementedError

    def decoded(self, call: pb.OpCall) -> bool:
        """Prepare for a call decoded afresh (raise ``BadRequestError`` to refuse it); whether it
        may be planned (its tensor lies in the channel's host memory)."""
        return True

    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Where the current call's output is written (``LimitExceededError`` if it cannot be)."""
        raise NotImplementedError

    def send(self, result: bytes, y: torch.Tensor | None) -> None:
        """Send the serialized ``OpResult`` of the current call (``y``: its output, written into
        ``output``'s tensor; None for an error)."""
        raise NotImplementedError

    def region(self, y: torch.Tensor) -> tuple[int, bool]:
        """Where the output ``y`` lies: its offset in the channel's memory, and whether on the device."""
        raise NotImplementedError

    def hang_up(self) -> None:
        """End the channel: at once while it waits for its client, after the call in progress otherwise."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- the loop
    def serve(self) -> None:
        """Answer calls until the client hangs up or the channel is hung up."""
        handler, tenant = self.host.handler, self.tenant
        while True:
            self._answered.acquire()  # the previous call was answered
            try:
                got = self.receive()
            except BadRequestError as exc:
                self._call_id, self._lead = 0, b""
                self.complete(None, exc)
                if isinstance(exc, FrameError):  # a byte stream cannot find the next frame: end it
                    return
                continue
            except OSError as exc:
                log.debug("channel %s ended: %s", self.name, exc)
                return
            if got is None:
                return
            message, regions, frame = got
            self.idle_since = math.inf
            end = call_id_end(message)
            key = (bytes(message[end:]), frame) if end else None
            plan = self._plans.get(key) if end else None
            if plan is None:  # not a repeat of a planned call: decode it (and plan it, the first time)
                self._call_id, self._answer, self._lead = 0, b"", b""
                try:
                    call = parse_call(message)
                    self._call_id = call.call_id
                    if self.decoded(call) and end and key not in self._plans:
                        plan = self._plan(key, call, regions)
                except Exception as exc:
                    self.complete(None, exc)
                    continue
            if plan is None:
                handler.submit(call, tenant, self.complete, regions=regions, out=self.output)
            else:
                self._answer, self._lead = plan.answer, bytes(message[:end])
                handler.run(plan, tenant, self.complete)

    def _plan(self, key: tuple[bytes, Hashable], call: pb.OpCall, regions: RegionReader) -> CallPlan | None:
        """Plan ``call`` and keep the plan (or that it has none) under ``key``: the bytes after its
        call id and the receiver's frame. Only a description in protobuf's own serialization is
        planned (so it holds no call id: repeats of it differ in their call id alone), and only one
        whose tensor is a region of the channel's memory (a tensor sent inline would make a plan of
        every payload)."""
        description = pb.OpCall()
        description.CopyFrom(call)
        description.call_id = 0
        plan = None
        if call.x.WhichOneof("payload") == "region" and description.SerializeToString() == key[0]:
            plan = self.host.handler.plan(call, self.tenant, regions, self.output)
            if plan is not None:
                plan.answer = self._described(plan.out)
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def forget_plans(self) -> None:
        """Drop the plans kept (call when the memory their tensors view is replaced)."""
        self._plans.clear()

    def complete(self, y: torch.Tensor | None, error: BaseException | None) -> None:
        """Answer the current call (called once per call, by whichever thread computed it)."""
        try:
            if error is None:
                # two serialized messages concatenated parse as their merge: the call id, then the output
                # (a planned call's own call id bytes serve: OpCall and OpResult number it alike)
                lead = self._lead or pb.OpResult(call_id=self._call_id).SerializeToString()
                result = lead + (self._answer or self._described(y))
            else:
                message = pb.OpResult.FromString(self._lead) if self._lead else pb.OpResult(call_id=self._call_id)
                message.error.code = status_code_of(error).name
                message.error.message = str(error)[:MAX_ERROR_CHARS]
                result, y = message.SerializeToString(), None
            self.send(result, y)
        except OSError as exc:  # the client is gone; its channel ends when its thread reads again
            log.debug("answer on channel %s dropped: %s", self.name, exc)
        finally:
            self.idle_since = time.monotonic()
            self._answered.release()

    def _described(self, y: torch.Tensor) -> bytes:
        """A serialized ``OpResult`` holding only the output ``y`` (a region of the channel's memory),
        kept per shape and dtype: the calls of a channel have few distinct output shapes."""
        offset, device = self.region(y)
        key = (y.shape, y.dtype, offset, device)
        message = self._descriptions.get(key)
        if message is None:
            result = pb.OpResult()
            describe_region(y, offset, result.y, device=device)
            if len(self._descriptions) >= MAX_DESCRIPTIONS:
                self._descriptions.clear()
            message = self._descriptions[key] = result.SerializeToString()
        return message


class ChannelHost:
    """A bounded set of channels of one kind: at most ``max_channels`` at once, of which at most
    ``max_pending`` are not yet connected (each costs a thread and its memory). A channel polls for
    its client's next call for up to ``spin_s`` before it blocks (``transport.waiting``)."""

    #: What the host's channels are called in messages.
    what = "channels"

    def __init__(self, handler: RequestHandler, *, max_channels: int, max_pending: int, spin_s: float) -> None:
        self.handler = handler
        self.max_channels = max_channels
        self.max_pending = max_pending
        self.spin_s = spin_s
        self._lock = threading.Lock()
        self._channels: set[Channel] = set()
        self._draining = False

    def add(self, make: Callable[[], Channel]) -> Channel:
        """Create (``make``) and start a channel unless the server drains or is at a limit
        (``ExecutorUnavailableError``, ``LimitExceededError``)."""
        with self._lock:
            if self._draining:
                raise ExecutorUnavailableError("the server is shutting down")
            if len(self._channels) >= self.max_channels:
                raise LimitExceededError(f"the server has {self.max_channels} {self.what}, its limit")
            if sum(not channel.connected for channel in self._channels) >= self.max_pending:
                raise LimitExceededError(f"{self.max_pending} {self.what} are waiting for their clients, the server's limit")
            channel = make()
            self._channels.add(channel)
            channel.start()  # under the lock: drain() never sees a channel it cannot join
        return channel

    def drain(self, timeout_s: float | None = None) -> None:
        """Refuse new channels, end every channel after its current call and wait for them, at most
        ``timeout_s`` in all."""
        with self._lock:
            self._draining = True
            channels = list(self._channels)
        for channel in channels:
            channel.hang_up()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for channel in channels:
            channel.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def draining(self) -> bool:
        return self._draining

    def end_idle(self, idle_s: float) -> None:
        """Hang up connected channels that have not been called for more than ``idle_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            idle = [channel for channel in self._channels if channel.connected and now - channel.idle_since > idle_s]
        for channel in idle:
            channel.hang_up()

    def channel_count(self) -> int:
        with self._lock:
            return len(self._channels)

    def forget(self, channel: Channel) -> None:
        with self._lock:
            self._channels.discard(channel)
