"""PEFT configs for fine-tuning jobs: from a method name and a few common options, or from a JSON file.

The JSON file is any PEFT config in the format of a saved ``adapter_config.json`` (the file itself,
or the adapter directory that holds it), so every option of every method PEFT supports is reachable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftType,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)

from ..errors import UnsupportedFeatureError

#: Methods selectable by name, with the common options each takes.
METHODS = ("lora", "ia3", "loha", "lokr", "prefix-tuning", "prompt-tuning", "p-tuning")


def method_config(
    method: str,
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    num_virtual_tokens: int = 16,
) -> PeftConfig:
    """A causal-LM PEFT config for ``method`` (see ``METHODS``).

    ``target_modules`` is a list of module names, ``"all-linear"``, or None for PEFT's default for
    the model type; LoHa and LoKr (which have no such default) then target every linear layer.
    """
    targets = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
    builders = {
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets),
        "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=[] if targets else None),
        "loha": lambda: LoHaConfig(task_type="CAUSAL_LM", r=r, alpha=alpha, rank_dropout=dropout, target_modules=targets or "all-linear"),
        "lokr": lambda: LoKrConfig(task_type="CAUSAL_LM", r=r, alpha=alpha, rank_dropout=dropout, target_modules=targets or "all-linear"),
        "prefix-tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens),
        "prompt-tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens),
        "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens),
    }
    if method not in builders:
        raise ValueError(f"unknown PEFT method {method!r}; choose one of {', '.join(METHODS)} or give a PEFT config file")
    return check_trainable(builders[method]())


def load_config_file(path: str | Path) -> PeftConfig:
    """A PEFT config from a JSON file (``adapter_config.json`` format) or an adapter directory."""
    path = Path(path)
    file = path / "adapter_config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the PEFT config {file}: {exc}") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ValueError(f"{file} is not a PEFT config: it needs a \"peft_type\" (e.g. \"LORA\")")
    task = data.setdefault("task_type", "CAUSAL_LM")
    if task != "CAUSAL_LM":
        raise ValueError(f"{file}: task_type is {task!r}; fine-tuning jobs train causal LMs (CAUSAL_LM)")
    data["inference_mode"] = False
    try:
        config = PeftConfig.from_peft_type(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{file}: invalid PEFT config: {exc}") from None
    return check_trainable(config)


def check_trainable(config: PeftConfig) -> PeftConfig:
    """``config``, unless it needs something a fine-tuning job cannot do on a Symbiosis client."""
    if config.peft_type == PeftType.ADALORA:
        raise UnsupportedFeatureError(
            "AdaLoRA is not supported by fine-tuning jobs: its rank allocator keeps training state outside "
            "the adapter and optimizer, so a resumed job could not continue exactly; use LoRA, or AdaLoRA in "
            "your own loop on a load_model() client"
        )
    return config
