"""Which adapters the engine serves and which of them are resident.

Any number of adapters may be registered (their configs read); at most ``max_resident`` are loaded
at a time. A sequence's adapter is loaded when the sequence is about to run, on a background
thread, so running sequences keep stepping meanwhile; when room is needed, the least recently used
adapter that no sequence holds is evicted. Registration is thread-safe; residency is the engine
thread's (``acquire``, ``release``, ``collect``), and so is attaching an adapter's layers to the
model and detaching them (the ``attach``/``detach`` callbacks), always between two steps.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from torch import nn

from .loader import AdapterInfo, LoadedAdapter, load_adapter

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """Loading a registered adapter failed (the cause is chained)."""


class AdapterStore:
    """Registered adapters by name; resident ones (LRU) by their ``AdapterInfo``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_resident: int,
        attach: Callable[[LoadedAdapter], None],
        detach: Callable[[LoadedAdapter], None],
    ) -> None:
        if max_resident < 1:
            raise ValueError("max_resident must be >= 1")
        self.model = model
        self.max_resident = max_resident
        self._attach, self._detach = attach, detach
        self._lock = threading.Lock()
        self._registered: dict[str, AdapterInfo] = {}
        self._offered: list[LoadedAdapter] = []
        # engine thread only
        self._resident: OrderedDict[AdapterInfo, LoadedAdapter] = OrderedDict()
        self._users: Counter[AdapterInfo] = Counter()
        self._loading: dict[AdapterInfo, Future[LoadedAdapter]] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self._resident_names: tuple[str, ...] = ()  # published for other threads
        self.loads = 0
        self.evictions = 0

    # ---------------------------------------------------------------------------- any thread
    def register(self, info: AdapterInfo) -> None:
        """Serve ``info`` under its name; raises ``KeyError`` if the name is taken."""
        with self._lock:
            if info.name in self._registered:
                raise KeyError(info.name)
            self._registered[info.name] = info

    def unregister(self, name: str) -> AdapterInfo | None:
        """Stop serving ``name`` to new requests (its resident weights leave once no sequence holds them)."""
        with self._lock:
            return self._registered.pop(name, None)

    def get(self, name: str) -> AdapterInfo | None:
        with self._lock:
            return self._registered.get(name)

    def registered(self) -> list[AdapterInfo]:
        """Registered adapters in registration order."""
        with self._lock:
            return list(self._registered.values())

    def offer(self, loaded: LoadedAdapter) -> None:
        """Make ``loaded`` (loaded by another thread, e.g. an admin request) resident at the next ``collect``."""
        with self._lock:
            self._offered.append(loaded)

    def load(self, info: AdapterInfo) -> LoadedAdapter:
        """Load ``info``'s weights on the calling thread (not made resident)."""
        return load_adapter(self.model, info)

    # --------------------------------------------------------------------------- engine thread
    def acquire(self, info: AdapterInfo) -> LoadedAdapter | None:
        """``info``'s resident weights, held for one more sequence; None while they are being loaded
        (or wait for room). Raises ``AdapterLoadError`` if loading failed."""
        loaded = self._resident.get(info)
        if loaded is None:
            loaded = self._finish_loading(info)
        if loaded is None:
            return None
        self._resident.move_to_end(info)
        self._users[info] += 1
        return loaded

    def release(self, loaded: LoadedAdapter) -> None:
        """One sequence fewer holds ``loaded``."""
        self._users[loaded.info] -= 1
        if self._users[loaded.info] <= 0:
            del self._users[loaded.info]

    def collect(self) -> None:
        """Make offered adapters resident, and evict unregistered ones that no sequence holds."""
        with self._lock:
            offered, self._offered = self._offered, []
            registered = set(self._registered.values())
        for index, loaded in enumerate(offered):
            if loaded.info in self._resident:
                continue
            if not self._make_room(pending=1):  # all in use: try again at the next step
                with self._lock:
                    self._offered[:0] = offered[index:]
                break
            try:
                self._admit(loaded)
            except Exception:  # it is loaded again, and fails its requests, when they need it
                log.exception("cannot serve adapter %s", loaded.name)
        for info in [i for i in self._resident if i not in registered and not self._users[i]]:
            self._evict(info)

    def resident(self) -> list[str]:
        """Names of resident adapters, least recently used first (as of the last change; any thread)."""
        return list(self._resident_names)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------------- internals
    def _finish_loading(self, info: AdapterInfo) -> LoadedAdapter | None:
        future = self._loading.get(info)
        if future is None:
            if not self._make_room(pending=1):
                return None
            self._loading[info] = self._loader.submit(load_adapter, self.model, info)
            return None
        if not future.done():
            return None
        del self._loading[info]
        try:
            loaded = future.result()
            self._admit(loaded)  # attaching can fail too (a PEFT layer the dispatch cannot serve)
        except Exception as exc:
            raise AdapterLoadError(f"adapter {info.name!r} cannot be served: {exc}") from exc
        return loaded

    def _admit(self, loaded: LoadedAdapter) -> None:
        self._attach(loaded)
        self._resident[loaded.info] = loaded
        self._resident_names = tuple(info.name for info in self._resident)
        self.loads += 1

    def _make_room(self, pending: int = 0) -> bool:
        """Evict least recently used idle adapters until one more fits; False if all are in use."""
        while len(self._resident) + len(self._loading) + pending > self.max_resident:
            idle = next((info for info in self._resident if not self._users[info]), None)
            if idle is None:
                return False
            self._evict(idle)
        return True

    def _evict(self, info: AdapterInfo) -> None:
        loaded = self._resident.pop(info)
        self._resident_names = tuple(i.name for i in self._resident)
        self._detach(loaded)
        self.evictions += 1
        log.info("evicted adapter %s", info.name)
