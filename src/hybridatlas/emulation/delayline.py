"""A packet-level WAN between two network namespaces: a TUN device in each, joined by this process.

Every IP packet read from one side's TUN device is held for the one-way delay, after being serialised
at the link rate (packets queue behind each other, as on a real link), then written to the other
side's device. This is what `tc qdisc ... netem delay D rate R` does in the kernel; it exists because
kernels built without sch_netem (CONFIG_NET_SCH_NETEM unset) cannot run netem.

Run as `python -m hybridatlas.emulation.delayline --ns-a A --ns-b B --dev wan0 --delay-ms 10
--rate-mbit 100 [--rt-priority 30]`; it prints "ready" once both devices exist and runs until killed.
With `--rt-priority` it runs under SCHED_FIFO (where permitted), so that other work on the machine
cannot hold packets back: it sleeps in select() between packets and needs the CPU only briefly.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import select
import struct
import sys
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_QUEUE = 50_000


def enter_netns(name: str) -> None:
    """Move this thread into the named network namespace (/run/netns/<name>)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def open_tun(device: str) -> int:
    """A non-blocking TUN device (IP packets, no packet-info header) in the current namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Direction:
    """One direction of the link: serialisation at `rate_bps`, then `delay_s` of propagation."""

    def __init__(self, source: int, sink: int, delay_s: float, rate_bps: float) -> None:
        self.source, self.sink = source, sink
        self.delay_s, self.rate_bps = delay_s, rate_bps
        self.link_free = 0.0
        self.queue: deque[tuple[float, bytes]] = deque()

    def receive(self, now: float) -> None:
        while True:
            try:
                packet = os.read(self.source, 65536)
            except BlockingIOError:
                return
            if len(self.queue) >= MAX_QUEUE:
                continue  # tail drop, like a full qdisc
            sent = max(now, self.link_free) + (len(packet) * 8.0 / self.rate_bps if self.rate_bps > 0 else 0.0)
            self.link_free = sent
            self.queue.append((sent + self.delay_s, packet))

    def release(self, now: float) -> float | None:
        """Write every packet that is due; the time the next one is due, if any."""
        while self.queue and self.queue[0][0] <= now:
            _, packet = self.queue.popleft()
            try:
                os.write(self.sink, packet)
            except (BlockingIOError, OSError):
                pass  # device down or full: the packet is lost, as on a real link
        return self.queue[0][0] if self.queue else None


def set_realtime(priority: int) -> bool:
    """SCHED_FIFO at `priority` for this process; False (and a note on stderr) where not permitted."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (OSError, AttributeError) as exc:
        print(f"delay line: real-time priority not set ({exc}); packets may be delayed under CPU load",
              file=sys.stderr, flush=True)
        return False


def run(ns_a: str, ns_b: str, device: str, delay_ms: float, rate_mbit: float) -> None:
    enter_netns(ns_a)
    fd_a = open_tun(device)
    enter_netns(ns_b)
    fd_b = open_tun(device)
    rate = rate_mbit * 1e6
    directions = [Direction(fd_a, fd_b, delay_ms / 1e3, rate), Direction(fd_b, fd_a, delay_ms / 1e3, rate)]
    by_fd = {d.source: d for d in directions}
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        due = [t for t in (d.release(now) for d in directions) if t is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else 1.0
        readable, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            by_fd[fd].receive(now)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns-a", required=True)
    parser.add_argument("--ns-b", required=True)
    parser.add_argument("--dev", default="wan0")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    parser.add_argument("--rate-mbit", type=float, default=0.0, help="link rate (0 = unlimited)")
    parser.add_argument("--rt-priority", type=int, help="run under SCHED_FIFO at this priority (1-99)")
    args = parser.parse_args(argv)
    if args.rt_priority:
        set_realtime(args.rt_priority)
    try:
        run(args.ns_a, args.ns_b, args.dev, args.delay_ms, args.rate_mbit)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
