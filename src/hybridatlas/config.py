"""Configuration: packaged defaults (defaults.json) merged with a user TOML/JSON file."""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hybridatlas.errors import AtlasInputError

ONPREM_RESOURCES = ("cpu_cores", "memory_gib", "disk_gib")


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_default_dict() -> dict[str, Any]:
    """The packaged defaults as a plain dict."""
    text = resources.files("hybridatlas").joinpath("defaults.json").read_text(encoding="utf-8")
    return json.loads(text)


def _read_user_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AtlasInputError(path, "configuration file not found")
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(path.read_text(encoding="utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise AtlasInputError(path, f"not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc


@dataclass(frozen=True)
class RoundTripRule:
    """Round trips one call costs when it crosses the WAN, as a function of its payload (the larger of
    request and response bytes per call).

    With `points` ((payload bytes, round trips) pairs measured by `hybridatlas calibrate`), the value
    is interpolated in log(payload) between points, held below the first and extended along the last
    segment's per-byte slope beyond the last. `points` hold for a connection that sat idle longer than
    TCP's retransmission timeout (slow start restarts), `warm_points` for one in use (its congestion
    window open). Otherwise base + ceil(payload / per_chunk_bytes), or base alone. `operation` globs
    the span's operation, `kind` the callee's kind.
    """

    operation: str
    kind: str
    base: float
    per_chunk_bytes: float | None = None
    points: tuple[tuple[float, float], ...] = ()
    warm_points: tuple[tuple[float, float], ...] = ()

    def round_trips(self, payload_bytes: float, warm: bool = False) -> float:
        if warm and self.warm_points:
            return _interpolate(self.warm_points, payload_bytes)
        if self.points:
            return _interpolate(self.points, payload_bytes)
        if not self.per_chunk_bytes:
            return self.base
        return self.base + max(1.0, float(-(-payload_bytes // self.per_chunk_bytes)))


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    xs = [p[0] for p in points]
    if x <= xs[0] or len(points) == 1:
        return points[0][1]
    if x >= xs[-1]:
        (x0, y0), (x1, y1) = points[-2], points[-1]
        return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (x - x1)
    k = next(i for i in range(1, len(xs)) if x <= xs[i])
    (x0, y0), (x1, y1) = points[k - 1], points[k]
    share = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return y0 + share * (y1 - y0)


def parse_ingress(value: Any, source: str) -> float:
    """Share of users' traffic entering through the cloud: 'onprem' = 0, 'cloud' = 1, or a number in [0, 1]."""
    if value == "onprem":
        return 0.0
    if value == "cloud":
        return 1.0
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise AtlasInputError(source, f"ingress must be 'onprem', 'cloud' or the cloud share of traffic in [0, 1], got {value!r}")
    return share


@dataclass(frozen=True)
class AtlasConfig:
    """Validated configuration. `raw` keeps the merged dict for reporting."""

    raw: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "AtlasConfig":
        """Defaults, then the user file at `path`, then `overrides` (e.g. from CLI flags)."""
        merged = load_default_dict()
        if path is not None:
            merged = _deep_merge(merged, _read_user_file(Path(path)))
        if overrides:
            merged = _deep_merge(merged, overrides)
        config = cls(merged)
        config.validate(str(path) if path else "configuration")
        return config

    def validate(self, source: str) -> None:
        """Raise AtlasInputError naming the key for values that cannot work."""
        if self.rtt_ms < 0:
            raise AtlasInputError(source, f"wan.rtt_ms must be >= 0, got {self.rtt_ms}")
        if self.bandwidth_bytes_per_s <= 0:
            raise AtlasInputError(source, "wan.bandwidth_gbps must be > 0")
        if not self.instances:
            raise AtlasInputError(source, "cost.instances is empty: at least one instance type is needed")
        for inst in self.instances:
            for key in ("name", "vcpu", "memory_gib", "per_hour"):
                if key not in inst:
                    raise AtlasInputError(source, f"cost.instances entry {inst} lacks '{key}'")
            if not 0 < float(inst.get("baseline_cpu_share", 1.0)) <= 1:
                raise AtlasInputError(source, f"cost.instances entry {inst['name']}: baseline_cpu_share must be in (0, 1]")
        for rule in self.raw["database_rules"]:
            for key in ("caller", "operation_prefix", "component"):
                if key not in rule:
                    raise AtlasInputError(source, f"database_rules entry {rule} lacks '{key}'")
        if self.headroom < 0:
            raise AtlasInputError(source, "cost.headroom must be >= 0")
        parse_ingress(self.raw.get("ingress", "onprem"), f"{source}: ingress")
        for rule in self.raw["round_trips"]:
            if "base" not in rule and not rule.get("points"):
                raise AtlasInputError(source, f"round_trips entry {rule} needs 'base' or 'points'")
            for key in ("points", "warm_points"):
                points = rule.get(key) or []
                if any(len(p) != 2 or p[0] <= 0 or p[1] < 0 for p in points) or \
                        any(a[0] >= b[0] for a, b in zip(points, points[1:])):
                    raise AtlasInputError(source, f"round_trips entry {rule.get('operation')}: {key} must be [payload bytes "
                                          "> 0, round trips >= 0] pairs in increasing payload order")
        limit = self.raw["live"]["jaeger_limit"]
        if not isinstance(limit, int) or limit < 1:
            raise AtlasInputError(source, f"live.jaeger_limit must be a whole number >= 1, got {limit!r}")

    # --- WAN -------------------------------------------------------------------------------
    @property
    def rtt_ms(self) -> float:
        return float(self.raw["wan"]["rtt_ms"])

    @property
    def series_window_s(self) -> float | None:
        """Length of the trailing windows the byte and call series count over (None: the data's own, 60 s)."""
        value = self.raw.get("series_window_s")
        return None if value is None else float(value)

    @property
    def idle_after_s(self) -> float:
        """A connection unused this long restarts slow start: TCP's minimum retransmission timeout + RTT."""
        return float(self.raw["wan"].get("rto_min_ms", 200.0)) / 1e3 + self.rtt_ms / 1e3

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return float(self.raw["wan"]["bandwidth_gbps"]) * 1e9 / 8.0

    # --- components ------------------------------------------------------------------------
    @property
    def gateway(self) -> str:
        return str(self.raw["gateway"])

    def kind_of(self, component: str) -> str:
        """Kind inferred from the name by the `component_kinds` suffix rules ('service' if none)."""
        for rule in self.raw["component_kinds"]:
            if component.endswith(rule["suffix"]):
                return str(rule["kind"])
        return "service"

    @property
    def database_rules(self) -> list[dict[str, str]]:
        return list(self.raw["database_rules"])

    @property
    def async_operations(self) -> list[str]:
        return list(self.raw["async_operations"])

    @property
    def background_overhang_us(self) -> float:
        """A child ending more than this after its parent is background (timestamps are rounded to 1 us)."""
        return float(self.raw["background_overhang_us"])

    def round_trip_rule(self, operation: str, kind: str = "service") -> RoundTripRule:
        """First rule whose `operation` glob matches the operation and `kind` glob the callee's kind
        (both default '*'); the defaults end with a catch-all."""
        for rule in self.raw["round_trips"]:
            if fnmatch.fnmatchcase(operation, rule.get("operation", "*")) and fnmatch.fnmatchcase(kind, rule.get("kind", "*")):
                return RoundTripRule(rule.get("operation", "*"), rule.get("kind", "*"), float(rule.get("base", 1.0)),
                                     rule.get("per_chunk_bytes"), tuple(tuple(map(float, p)) for p in rule.get("points") or ()),
                                     tuple(tuple(map(float, p)) for p in rule.get("warm_points") or ()))
        return RoundTripRule("*", "*", 1.0)

    @property
    def ingress_cloud_share(self) -> float:
        """Share of users' requests entering through a cloud gateway (0 = all through the on-prem one)."""
        return parse_ingress(self.raw.get("ingress", "onprem"), "ingress")

    # --- placement constraints -------------------------------------------------------------
    @property
    def pinned_onprem(self) -> list[str]:
        return list(self.raw["placement"]["pinned_onprem"])

    @property
    def pinned_onprem_kinds(self) -> list[str]:
        return list(self.raw["placement"]["pinned_onprem_kinds"])

    @property
    def pinned_cloud(self) -> list[str]:
        return list(self.raw["placement"]["pinned_cloud"])

    @property
    def stateful(self) -> dict[str, list[str]]:
        return dict(self.raw["stateful"])

    @property
    def critical_apis(self) -> list[str]:
        return list(self.raw["availability"]["critical_apis"])

    @property
    def critical_weight(self) -> float:
        return float(self.raw["availability"]["critical_weight"])

    def onprem_capacity(self) -> dict[str, float | None]:
        """cpu_cores, memory_gib, disk_gib of the on-prem cluster (None = unconstrained)."""
        section = self.raw["onprem"]
        return {key: (None if section.get(key) is None else float(section[key])) for key in ONPREM_RESOURCES}

    @property
    def budget_per_month(self) -> float | None:
        value = self.raw.get("budget_per_month")
        return None if value is None else float(value)

    # --- forecast, cost, search ------------------------------------------------------------
    @property
    def forecast(self) -> dict[str, Any]:
        return dict(self.raw["forecast"])

    @property
    def cost(self) -> dict[str, Any]:
        return dict(self.raw["cost"])

    @property
    def headroom(self) -> float:
        return float(self.raw["cost"]["headroom"])

    @property
    def instances(self) -> list[dict[str, Any]]:
        return list(self.raw["cost"]["instances"])

    @staticmethod
    def sustained_vcpu(instance: dict[str, Any]) -> float:
        """vCPUs an instance sustains: vcpu x baseline_cpu_share (1 unless burstable)."""
        return float(instance["vcpu"]) * float(instance.get("baseline_cpu_share", 1.0))

    @property
    def search(self) -> dict[str, Any]:
        return dict(self.raw["search"])

    @property
    def live(self) -> dict[str, Any]:
        return dict(self.raw["live"])
