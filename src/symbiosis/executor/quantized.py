"""Frozen linear ops held quantized by bitsandbytes: int8 (LLM.int8 weights) and 4-bit (NF4 / FP4).

Loading goes through transformers' own bitsandbytes integration (``BitsAndBytesConfig``), so an
executor's quantized weights are bit for bit those of a monolithic model loaded the same way (the
QLoRA recipe), and pre-quantized checkpoints load as well. The rest of the base follows PEFT's
``prepare_model_for_kbit_training``: every weight that stays dense (norms, embeddings, the LM head,
biases) is held in float32.

A product dequantises the weight into the compute dtype and runs one dense GEMM, forward ``x·Wᵀ``
and backward ``grad_y·W`` alike — what bitsandbytes' own autograd functions do when a QLoRA model
trains (``MatMul4Bit``; ``MatMul8bitFp`` for int8 on CPU). Rows never mix: LLM.int8's activation
quantization, whose outlier columns are chosen over the whole batch, is not used, so a batch of many
clients gives each client the rows it would get alone. The dequantised copy lives only for the
product; the quantized weight is the only resident copy, also for fused ops (see ``QuantizedOp``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from ..protocol import Direction, OpInfo

#: ``quantization=`` names: LLM.int8 weights (per-row absmax), 4-bit NormalFloat and 4-bit float.
QUANTIZATIONS = ("int8", "nf4", "fp4")
#: Other accepted spellings: ``4bit`` is NF4 (QLoRA's data type).
ALIASES = {"8bit": "int8", "4bit": "nf4"}


def quantization_config(quantization: str | BitsAndBytesConfig, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` for ``quantization`` (a name of ``QUANTIZATIONS`` or a config, used as is).

    4-bit follows the QLoRA recipe: double quantization of the block scales, products in ``compute_dtype``.
    """
    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    name = ALIASES.get(str(quantization).lower(), str(quantization).lower())
    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS + tuple(ALIASES))}")


def load_options(path: Path, quantization: str | BitsAndBytesConfig, compute_dtype: torch.dtype) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments that load the checkpoint at ``path`` quantized.

    ``{"quantization_config": ...}``, or nothing for a checkpoint saved quantized that way already
    (transformers loads its own config; another quantization is refused). Raises ``ImportError`` with
    the install command when bitsandbytes is missing.
    """
    config = quantization_config(quantization, compute_dtype)
    _import_bitsandbytes()
    saved = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    if saved is None:
        return {"quantization_config": config}
    saved_name = "int8" if saved.get("load_in_8bit") else saved.get("bnb_4bit_quant_type")
    if saved.get("quant_method") != "bitsandbytes" or saved_name != _name(config):
        raise ValueError(f"{path} is saved quantized ({saved.get('quant_method')} {saved_name or ''}); "
                         f"it cannot be loaded as {_name(config)}: omit the quantization or use the unquantized checkpoint")
    return {}


def _name(config: BitsAndBytesConfig) -> str:
    return "int8" if config.load_in_8bit else config.bnb_4bit_quant_type


def _import_bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError('quantized executors need bitsandbytes: pip install "symbiosis[quantization]"') from exc
    return bitsandbytes


def is_quantized_linear(module: nn.Module) -> bool:
    """True for bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (and subclasses that keep their forward)."""
    bnb = sys.modules.get("bitsandbytes")  # no module can be one unless bitsandbytes was imported
    if bnb is None:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and type(module).forward in (
        bnb.nn.Linear4bit.forward, bnb.nn.Linear8bitLt.forward)


def from_conv1d(module: nn.Module) -> bool:
    """Whether a quantized module replaced a GPT-2 style ``Conv1D`` (transformers transposed its weight)."""
    source = getattr(module, "source_cls", None)
    return isinstance(source, type) and issubclass(source, Conv1D)


def prepare_quantized_base(model: nn.Module) -> str | None:
    """Make a bitsandbytes-quantized model ready to serve and name its quantization (``"nf4"``, ...);
    ``None`` (and nothing done) for other models.

    Applies PEFT's ``prepare_model_for_kbit_training`` without gradient checkpointing (freeze every
    weight, dense float16/bfloat16 weights to float32: what a QLoRA user's model holds), and turns off
    bitsandbytes' CPU inference path, which would re-pack the shared 4-bit weights into a layout the
    executor's products cannot read.
    """
    modules = [m for m in model.modules() if is_quantized_linear(m)]
    if not modules:
        return None
    from peft import prepare_model_for_kbit_training

    for module in modules:
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("a 4-bit weight of this model was re-packed for CPU inference (the model ran in eval mode "
                             "before); load it afresh and hand it to the executor before running it")
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    names = {getattr(m.weight, "quant_type", None) or "int8" for m in modules}
    return "+".join(sorted(names))


@dataclass(frozen=True)
class QuantizedWeight:
    """One module's quantized ``[out, in]`` weight: 4-bit data with its ``QuantState``, or int8 rows with their scales."""

    data: torch.Tensor
    quant_state: Any = None  # bitsandbytes.functional.QuantState (4-bit)
    row_scales: torch.Tensor | None = None  # SCB: absmax of each row (int8)

    @classmethod
    def of(cls, module: nn.Module) -> QuantizedWeight:
        weight = module.weight
        if getattr(weight, "quant_state", None) is not None:
            return cls(weight.data, quant_state=weight.quant_state)
        # int8 row scales sit on the weight until the module's first forward moves them to its state
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if scales is None or weight.dtype != torch.int8:
            raise ValueError(f"{type(module).__name__} holds no quantized weight (int8 weights kept in float are not supported)")
        return cls(weight.data, row_scales=scales)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.quant_state.shape) if self.quant_state is not None else tuple(self.data.shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype``, computed as bitsandbytes computes it for a product."""
        if self.quant_state is not None:
            from bitsandbytes.functional import dequantize_4bit

            dense = dequantize_4bit(self.data, self.quant_state)
            return dense if dense.dtype == dtype else dense.to(dtype)
        return self.data.to(dtype).mul_(self.row_scales.unsqueeze(1).mul(1.0 / 127.0))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this weight holds (data, block scales, codebooks)."""
        if self.quant_state is None:
            return [self.data, self.row_scales]
        state, held = self.quant_state, [self.data]
        while state is not None:
            held += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
            state = state.state2 if state.nested else None
        return held


@dataclass
class QuantizedOp:
    """A frozen linear op whose weight is held quantized; the same ``apply`` contract as ``FrozenOp``.

    ``parts`` are the quantized weights whose rows make up the op, in order: one for a single module,
    the members' for a fused op (q/k/v, gate/up). A fused op dequantises each member into its rows of
    one dense buffer and runs one GEMM; member ops hold the very same parts, so nothing quantized is
    held twice. ``compute_dtype``: the dtype products run in (bitsandbytes' ``compute_dtype`` of a
    4-bit module); ``None`` computes in the dtype of the input (int8, as bitsandbytes does).
    """

    info: OpInfo
    parts: tuple[QuantizedWeight, ...]
    compute_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, info: OpInfo, module: nn.Module) -> QuantizedOp:
        return cls(info, (QuantizedWeight.of(module),), getattr(module, "compute_dtype", None))

    @classmethod
    def fused(cls, info: OpInfo, members: list[QuantizedOp]) -> QuantizedOp:
        """The op of ``members`` side by side (rows concatenated); they must compute in one dtype."""
        dtypes = {m.compute_dtype for m in members}
        if len(dtypes) != 1:
            raise ValueError(f"{info.name}: members compute in different dtypes {dtypes}")
        return cls(info, tuple(p for m in members for p in m.parts), dtypes.pop())

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (a new tensor, in the compute dtype or float32)."""
        return self.dequantized(self.compute_dtype or torch.float32)

    def dequantized(self, dtype: torch.dtype, features: tuple[int, int] | None = None) -> torch.Tensor:
        """The op's ``[out, in]`` weight in ``dtype`` (only rows ``features = (start, end)``), built for one product."""
        start, end = features or (0, self.info.out_features)
        if len(self.parts) == 1:
            dense = self.parts[0].dequantize(dtype)
            return dense if features is None else dense[start:end]
        dense = torch.empty(end - start, self.info.in_features, dtype=dtype, device=self.parts[0].data.device)
        first = 0
        for part in self.parts:  # each member's rows that fall in [start, end)
            last = first + part.shape[0]
            if first < end and last > start:
                lo, hi = max(first, start), min(last, end)
                dense[lo - start:hi - start].copy_(part.dequantize(dtype)[lo - first:hi - first])
            first = last
        return dense

    def apply(
        self,
        direction: Direction,
        x: torch.Tensor,
        *,
        features: tuple[int, int] | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Forward ``x·Wᵀ`` / backward ``grad_y·W`` on 2-D rows ``x`` (with rows ``features`` of W only, its
        values first rounded to ``weight_dtype`` when given), in the compute dtype; the result in ``x``'s dtype."""
        dtype = self.compute_dtype or x.dtype
        weight = self.dequantized(dtype, features)
        if weight_dtype is not None:
            weight = weight.to(weight_dtype).to(dtype)
        y = torch.mm(x.to(dtype), weight.t() if direction is Direction.FORWARD else weight)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def held_tensors(self) -> list[torch.Tensor]:
        return [t for part in self.parts for t in part.tensors()]
