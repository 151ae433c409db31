"""Two network namespaces, "onprem" and "cloud", joined by an emulated WAN (round-trip time, rate).

The WAN is `tc netem` on a veth pair where the kernel has sch_netem, else the userspace delay line
(`hybridatlas.emulation.delayline`) between two TUN devices. Only the namespaces created here are
touched: no host interface, address or route changes. Names carry the process id and a counter, so
concurrent runs never clash, and everything is removed on exit (also on error, and at interpreter
exit for anything a crash left behind).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from hybridatlas.errors import AtlasInputError

SIDES = ("onprem", "cloud")
ADDRESSES = {"onprem": "198.18.0.1", "cloud": "198.18.0.2"}  # RFC 2544 benchmarking range, inside the namespaces only
DEVICE = "wan0"
_counter = itertools.count()
_live: set[str] = set()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def unavailable_reason() -> str | None:
    """Why namespaces with an emulated WAN cannot be built here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (Debian package iproute2)"
    if not os.path.exists("/dev/net/tun") and not netem_available():
        return "neither sch_netem nor /dev/net/tun is available for the WAN emulation"
    return None


def _delete_netns(name: str) -> None:
    _ip("netns", "del", name, check=False)
    _live.discard(name)


@atexit.register
def _cleanup_leftovers() -> None:
    for name in list(_live):
        _delete_netns(name)


def netem_available() -> bool:
    """Whether the kernel runs `tc qdisc ... netem` (probed on a veth inside a throwaway namespace)."""
    name = f"haprobe{os.getpid()}x{next(_counter)}"
    _ip("netns", "add", name)
    _live.add(name)
    try:
        made = _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if made.returncode != 0:
            return False
        probe = subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"],
                               capture_output=True, text=True)
        return probe.returncode == 0
    finally:
        _delete_netns(name)


@dataclass
class EmulatedWan:
    """Context manager: namespaces `netns[side]`, addresses `ADDRESSES[side]`, WAN of `rtt_ms` and `rate_mbit`.

    `mode` is "netem", "delayline" or "auto" (netem when the kernel has it). `congestion_control` is set
    on the routes across the WAN (default cubic, Linux's default; None keeps the host's), since round
    trips of large transfers depend on it (slow start, restart after idle). The delay line runs under
    SCHED_FIFO at `realtime_priority` where permitted (None: normal scheduling), so that CPU load on
    the machine does not stretch the emulated delay.
    """

    rtt_ms: float
    rate_mbit: float = 1000.0
    mode: str = "auto"
    congestion_control: str | None = "cubic"
    realtime_priority: int | None = 30

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.rate_mbit < 0:
            raise AtlasInputError("WAN emulation", "rtt_ms and rate_mbit must be >= 0")
        tag = f"ha{os.getpid()}x{next(_counter)}"
        self.netns = {side: f"{tag}{side[0]}" for side in SIDES}
        self._delayline: subprocess.Popen | None = None

    def __enter__(self) -> "EmulatedWan":
        reason = unavailable_reason()
        if reason:
            raise AtlasInputError("WAN emulation", reason)
        if self.mode == "auto":
            self.mode = "netem" if netem_available() else "delayline"
        try:
            for side in SIDES:
                _ip("netns", "add", self.netns[side])
                _live.add(self.netns[side])
                _ip("-n", self.netns[side], "link", "set", "lo", "up")
            self._start_link()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_link(self) -> None:
        a, b = self.netns["onprem"], self.netns["cloud"]
        one_way = f"{self.rtt_ms / 2:.3f}ms"
        if self.mode == "netem":
            _ip("link", "add", DEVICE, "netns", a, "type", "veth", "peer", "name", DEVICE, "netns", b)
            for ns in (a, b):
                rate = ["rate", f"{self.rate_mbit}mbit"] if self.rate_mbit > 0 else []
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", DEVICE, "root", "netem", "delay", one_way,
                                "limit", "100000", *rate], check=True, capture_output=True, text=True)
        elif self.mode == "delayline":
            self._delayline = subprocess.Popen(
                [sys.executable, "-m", "hybridatlas.emulation.delayline", "--ns-a", a, "--ns-b", b, "--dev", DEVICE,
                 "--delay-ms", str(self.rtt_ms / 2), "--rate-mbit", str(self.rate_mbit),
                 *(["--rt-priority", str(self.realtime_priority)] if self.realtime_priority else [])],
                stdout=subprocess.PIPE, text=True)
            if self._delayline.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise AtlasInputError("WAN emulation", "the delay line did not start")
        else:
            raise AtlasInputError("WAN emulation", f"unknown mode {self.mode!r}: netem, delayline or auto")
        for side, other in (("onprem", "cloud"), ("cloud", "onprem")):
            ns = self.netns[side]
            _ip("-n", ns, "addr", "add", ADDRESSES[side], "peer", ADDRESSES[other], "dev", DEVICE)
            _ip("-n", ns, "link", "set", DEVICE, "up")
            if self.congestion_control:
                _ip("-n", ns, "route", "replace", ADDRESSES[other], "dev", DEVICE, "congctl", self.congestion_control)

    def close(self) -> None:
        """Stop the link and delete both namespaces (idempotent)."""
        if self._delayline is not None:
            self._delayline.terminate()
            try:
                self._delayline.wait(5)
            except subprocess.TimeoutExpired:
                self._delayline.kill()
                self._delayline.wait()
            self._delayline = None
        for ns in self.netns.values():
            _delete_netns(ns)

    def command(self, side: str, argv: list[str]) -> list[str]:
        """argv run inside `side`'s namespace."""
        return ["ip", "netns", "exec", self.netns[side], *argv]

    @staticmethod
    def address(side: str) -> str:
        return ADDRESSES[side]
