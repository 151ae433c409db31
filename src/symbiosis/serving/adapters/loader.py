"""Reading and loading PEFT adapter directories for the engine, through PEFT's own loading path.

``read_adapter`` checks an adapter's ``adapter_config.json`` (cheap: registration of hundreds);
``load_adapter`` builds its weights. Loading runs ``PeftModel.from_pretrained`` on a *skeleton* of
the engine's model: fresh container modules (model, decoder layers, attention and MLP blocks)
around the model's own leaf modules, so PEFT wraps the real base modules in its layers while the
engine's model stays untouched and nothing is copied. What the engine keeps:

* tuner methods (LoRA, AdaLoRA, IA3, LoHa, LoKr, OFT, ...): PEFT's layer for each targeted module
  (for LoRA on parameters, ``target_parameters``: the outermost ``ParamWrapper`` of each module);
* prompt tuning and p-tuning: the virtual tokens' input embeddings (``get_prompt``);
* prefix tuning: each layer's prefix keys and values (``get_prompt``).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, PeftType
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layer import RowDispatch

#: Prompt-learning methods the engine serves (their virtual tokens or prefix go into a sequence's cache).
PROMPT_METHODS = frozenset({PeftType.PROMPT_TUNING, PeftType.P_TUNING, PeftType.PREFIX_TUNING})
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(ValueError):
    """A directory that is no adapter this engine can serve (the message says why)."""


@dataclass(frozen=True, eq=False)
class AdapterInfo:
    """A registered adapter: its name, directory and PEFT config (read, not loaded)."""

    name: str
    path: Path
    config: PeftConfig

    @property
    def peft_type(self) -> str:
        return str(self.config.peft_type.value)

    @property
    def virtual_tokens(self) -> int:
        """Positions the adapter puts ahead of the prompt (prompt-learning methods), else 0."""
        return self.config.num_virtual_tokens if self.config.is_prompt_learning else 0


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter's weights as the engine uses them (one of the three is set, by method)."""

    info: AdapterInfo
    layers: dict[str, nn.Module]
    prompt: torch.Tensor | None = None
    prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    @property
    def name(self) -> str:
        return self.info.name

    def __repr__(self) -> str:
        return f"LoadedAdapter({self.name!r}, {self.info.peft_type}, {len(self.layers)} layers)"


def read_adapter(name: str, path: str | Path) -> AdapterInfo:
    """The adapter in directory ``path``; raises ``AdapterError`` for anything the engine cannot serve."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if not any((path / weights).is_file() for weights in _WEIGHTS):
        raise AdapterError(f"{path} has no adapter weights ({' or '.join(_WEIGHTS)})")
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as exc:  # PEFT's own message says what does not fit
        raise AdapterError(f"cannot read the adapter config in {path}: {exc}") from exc
    if config.is_prompt_learning and config.peft_type not in PROMPT_METHODS:
        raise AdapterError(f"{config.peft_type.value} adapters are not supported (prompt learning: {', '.join(sorted(m.value for m in PROMPT_METHODS))})")
    if config.peft_type == PeftType.ADAPTION_PROMPT:
        raise AdapterError("ADAPTION_PROMPT adapters are not supported: they replace the attention modules")
    if config.is_prompt_learning and (config.task_type or "").upper() != "CAUSAL_LM":
        raise AdapterError(f"prompt-learning adapters must be saved with task_type CAUSAL_LM, not {config.task_type!r}")
    if getattr(config, "modules_to_save", None):
        raise AdapterError("adapters with modules_to_save (full copies of base modules) are not supported")
    if json.loads(config_file.read_text()).get("use_dora"):
        raise AdapterError("DoRA adapters are not supported: they need the base weights, which live on the executor")
    return AdapterInfo(name, path, config)


def load_adapter(model: nn.Module, info: AdapterInfo) -> LoadedAdapter:
    """Build ``info``'s weights on ``model`` (the engine's model, which stays unchanged)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*should not be contained in the prefix.*")
            peft_model = PeftModel.from_pretrained(_skeleton(model), info.path, low_cpu_mem_usage=True).eval()
    except Exception as exc:
        raise AdapterError(f"cannot load the adapter in {info.path}: {exc}") from exc
    if not info.config.is_prompt_learning:
        prefix = "base_model.model."
        tuners = {name.removeprefix(prefix): module for name, module in peft_model.named_modules() if isinstance(module, BaseTunerLayer)}
        # LoRA on several parameters of one module nests PEFT's wrappers: the outermost one serves them all
        layers = {name: module for name, module in tuners.items() if not _inside(name, tuners)}
        if not layers:
            raise AdapterError(f"the adapter in {info.path} targets no module of this model")
        return LoadedAdapter(info, layers)
    with torch.no_grad():
        prompt = peft_model.get_prompt(batch_size=1)
    if info.config.peft_type == PeftType.PREFIX_TUNING:
        return LoadedAdapter(info, {}, prefix=_prefix_layers(prompt))
    return LoadedAdapter(info, {}, prompt=prompt[0].detach())


def _inside(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether module path ``name`` lies inside another path of ``modules``."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _prefix_layers(prompt) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per layer ``(keys, values)``, each ``[kv_heads, virtual_tokens, head_dim]``, from ``get_prompt``'s cache or tuple."""
    layers = getattr(prompt, "layers", None)
    pairs = [(layer.keys, layer.values) for layer in layers] if layers is not None else [(k, v) for k, v in prompt]
    return tuple((k[0].detach().clone(), v[0].detach().clone()) for k, v in pairs)


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s container structure that shares every leaf module (and so every tensor),
    with the engine's dispatch wrappers replaced by the base modules they wrap."""
    if isinstance(module, RowDispatch):
        return module.base
    if not module._modules:
        return module
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else _skeleton(child) for name, child in module._modules.items()}
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone
