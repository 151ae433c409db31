"""Configuration: packaged defaults (defaults.json) merged with a user TOML/JSON file."""

from __future__ import annotations

import copy
import fnmatch
import json
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
    """Round trips one call costs when it crosses the WAN: base + ceil(bytes / per_chunk_bytes)."""

    operation: str
    base: float
    per_chunk_bytes: float | None

    def round_trips(self, payload_bytes: float) -> float:
        if not self.per_chunk_bytes:
            return self.base
        return self.base + max(1.0, float(-(-payload_bytes // self.per_chunk_bytes)))


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
        limit = self.raw["live"]["jaeger_limit"]
        if not isinstance(limit, int) or limit < 1:
            raise AtlasInputError(source, f"live.jaeger_limit must be a whole number >= 1, got {limit!r}")

    # --- WAN -------------------------------------------------------------------------------
    @property
    def rtt_ms(self) -> float:
        return float(self.raw["wan"]["rtt_ms"])

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

    def round_trip_rule(self, operation: str) -> RoundTripRule:
        """First rule whose `operation` glob matches; the defaults end with a catch-all '*'."""
        for rule in self.raw["round_trips"]:
            if fnmatch.fnmatchcase(operation, rule["operation"]):
                return RoundTripRule(rule["operation"], float(rule["base"]), rule.get("per_chunk_bytes"))
        return RoundTripRule("*", 1.0, None)

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
