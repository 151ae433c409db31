"""Tenants of the executor service: who may call it (by token), at what priority, within which limits.

A tenants file (JSON or TOML, by suffix) lists tenants::

    [[tenants]]
    name = "alice"
    token = "a-long-random-secret"          # or token_sha256 = "<hex digest of the token>"
    priority = 0                            # added to every request's priority (0: none)
    stats = false                           # may see the executor's batch statistics (all tenants' traffic)
    [tenants.limits]                        # every limit is optional (absent: unlimited)
    concurrent_requests = 8                 # op requests in flight at once
    rows_per_request = 8192
    payload_bytes = 67108864                # bytes of one request's tensor
    requests_per_second = 5000              # token bucket, burst = one second's worth
    sessions = 16                           # open streams and shared-memory channels

Without a tenants file the service is open: one tenant ``default``, no token, no limits, and it
sees the batch statistics.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AuthenticationError, LimitExceededError


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; ``None`` means unlimited."""

    concurrent_requests: int | None = None
    rows_per_request: int | None = None
    payload_bytes: int | None = None
    requests_per_second: float | None = None
    sessions: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"limit {f.name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Tenant:
    """A tenant: its name, the SHA-256 digest of its token, its priority offset, its limits, and
    whether it may see the executor's batch statistics (which reflect every tenant's traffic)."""

    name: str
    token_sha256: str
    priority: int = 0
    limits: Limits = field(default_factory=Limits)
    stats: bool = False


def token_digest(token: str) -> str:
    """The hex SHA-256 digest under which a token is looked up."""
    return hashlib.sha256(token.encode()).hexdigest()


class TenantState:
    """A tenant's live admission state: requests in flight, open sessions, rate bucket. Thread-safe."""

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self._lock = threading.Lock()
        self._in_flight = 0
        self._sessions = 0
        rate = tenant.limits.requests_per_second
        self._bucket = float(max(rate, 1.0)) if rate else 0.0
        self._refilled = time.monotonic()

    @property
    def name(self) -> str:
        return self.tenant.name

    def check_request(self, rows: int, nbytes: int) -> None:
        """Raise ``LimitExceededError`` if one request of ``rows`` rows and ``nbytes`` bytes is too large."""
        limits = self.tenant.limits
        if limits.rows_per_request is not None and rows > limits.rows_per_request:
            raise LimitExceededError(f"tenant {self.name!r}: {rows} rows exceed the limit of {limits.rows_per_request} rows per request")
        if limits.payload_bytes is not None and nbytes > limits.payload_bytes:
            raise LimitExceededError(f"tenant {self.name!r}: {nbytes} bytes exceed the limit of {limits.payload_bytes} bytes per request")

    def acquire(self) -> None:
        """Take one in-flight slot and one rate token for a request, or raise ``LimitExceededError``;
        ``release()`` gives the slot back when the request is answered."""
        limits = self.tenant.limits
        with self._lock:
            if limits.concurrent_requests is not None and self._in_flight >= limits.concurrent_requests:
                raise LimitExceededError(
                    f"tenant {self.name!r}: more than {limits.concurrent_requests} concurrent requests"
                )
            if limits.requests_per_second:
                now = time.monotonic()
                cap = max(limits.requests_per_second, 1.0)
                self._bucket = min(cap, self._bucket + (now - self._refilled) * limits.requests_per_second)
                self._refilled = now
                if self._bucket < 1.0:
                    raise LimitExceededError(f"tenant {self.name!r}: more than {limits.requests_per_second:g} requests per second")
                self._bucket -= 1.0
            self._in_flight += 1

    def release(self) -> None:
        """Give back the in-flight slot ``acquire`` took."""
        with self._lock:
            self._in_flight -= 1

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one in-flight slot and one rate token for the duration of a request, or raise."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    @contextmanager
    def session(self) -> Iterator[None]:
        """Hold one session (a stream or a shared-memory channel) while it is open, or raise."""
        limit = self.tenant.limits.sessions
        with self._lock:
            if limit is not None and self._sessions >= limit:
                raise LimitExceededError(f"tenant {self.name!r}: more than {limit} open sessions")
            self._sessions += 1
        try:
            yield
        finally:
            with self._lock:
                self._sessions -= 1

    def open_sessions(self) -> int:
        with self._lock:
            return self._sessions

    def requests_in_flight(self) -> int:
        """In-flight slots held (requests admitted and not yet answered)."""
        with self._lock:
            return self._in_flight


class TenantRegistry:
    """Resolves tokens to tenants; ``open()`` accepts any caller as tenant ``default``."""

    def __init__(self, tenants: list[Tenant], *, require_token: bool = True) -> None:
        names = [t.name for t in tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tenant names in {names}")
        digests = [t.token_sha256 for t in tenants]
        if len(set(digests)) != len(digests):
            raise ValueError("two tenants share a token")
        self.require_token = require_token
        self._states = {t.token_sha256: TenantState(t) for t in tenants}
        self._open = None if require_token else TenantState(Tenant("default", "", stats=True))

    @classmethod
    def open(cls) -> TenantRegistry:
        """No authentication: every caller is tenant ``default`` without limits, seeing the statistics."""
        return cls([], require_token=False)

    @classmethod
    def from_file(cls, path: str | Path) -> TenantRegistry:
        """Tenants from a ``.toml`` or ``.json`` file (see module docstring)."""
        path = Path(path)
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "tenants") -> TenantRegistry:
        entries = data.get("tenants")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{source}: expected a non-empty list 'tenants'")
        return cls([_tenant_from_dict(entry, source) for entry in entries])

    def authenticate(self, token: str | None) -> TenantState:
        """The tenant a token belongs to; ``AuthenticationError`` for a missing or unknown token."""
        if self._open is not None:
            return self._open
        if not token:
            raise AuthenticationError("this executor requires a token (load_model(..., token=...))")
        state = self._states.get(token_digest(token))
        if state is None:
            raise AuthenticationError("unknown token")
        return state

    def tenants(self) -> list[TenantState]:
        return [self._open] if self._open is not None else list(self._states.values())


_TENANT_KEYS = {"name", "token", "token_sha256", "priority", "limits", "stats"}


def _tenant_from_dict(entry: Any, source: str) -> Tenant:
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: each tenant must be a table/object, got {entry!r}")
    unknown = set(entry) - _TENANT_KEYS
    if unknown:
        raise ValueError(f"{source}: unknown tenant keys {sorted(unknown)} (known: {sorted(_TENANT_KEYS)})")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: every tenant needs a non-empty 'name'")
    if ("token" in entry) == ("token_sha256" in entry):
        raise ValueError(f"{source}: tenant {name!r} needs exactly one of 'token' or 'token_sha256'")
    digest = token_digest(entry["token"]) if "token" in entry else str(entry["token_sha256"]).lower()
    priority = entry.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise ValueError(f"{source}: tenant {name!r}: priority must be an int >= 0")
    stats = entry.get("stats", False)
    if not isinstance(stats, bool):
        raise ValueError(f"{source}: tenant {name!r}: stats must be true or false")
    limits = entry.get("limits", {})
    known = {f.name for f in fields(Limits)}
    if not isinstance(limits, dict) or set(limits) - known:
        raise ValueError(f"{source}: tenant {name!r}: limits must be a table with keys among {sorted(known)}")
    return Tenant(name, digest, priority, Limits(**limits), stats)
