"""Per-row adapters inside one forward.

In the engine's model every base module that adapters may target — each linear op of the executor,
the embeddings, the LM head — is wrapped in a ``RowDispatch``. During a step it computes the base
product once over all rows of the step (one executor request: a fused op's members together), and
each adapter that targets the module applies its own PEFT layer to its own rows (the step's row
groups, ``serving.batch``). Rows of adapters that do not target the module, and rows on the bare
base, get the base product alone.

The PEFT layer of an adapter is PEFT's own (``lora.Linear``, ``ia3.Linear``, ``loha.Linear``, ...),
so each method's arithmetic is PEFT's. Its ``base_layer`` is a ``SharedBase`` stub, and how the
layer calls its base layer is found once, when the adapter is attached, by probing:

* ``OUTPUT``: with the very input it was given (LoRA, AdaLoRA, LoHa, LoKr, IA3 on attention
  projections, ...). The stub hands back the group's rows of the shared product and the layer adds
  (or scales by) its part.
* ``INPUT``: with a transformed input, returning that product unchanged (IA3 on feed-forward
  modules, OFT). Before the shared product, the stub captures the transformed rows, which take the
  group's place in the product's input (for a fused op, as extra rows of the same request).
* ``OWN``: anything else. The layer runs on its rows with a base product of its own (a separate
  executor request for those rows: correct, not batched).

Several plain LoRA groups on one module are computed together (``adapters/lora.py``). A plain IA3
layer (one adapter, its vector in the rows' dtype) is applied as PEFT computes it — the rows times
its vector — without going through the layer's Python.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.ia3 import Linear as Ia3Linear
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...client import PhantomWeight
from .. import batch
from .lora import LoraStack, LoraWeights, plain_lora


class Side(enum.Enum):
    """How a PEFT layer calls its base layer (see the module docstring)."""

    OUTPUT = "output"
    INPUT = "input"
    OWN = "own"


class DispatchError(RuntimeError):
    """A PEFT layer called its base layer differently than it did when probed."""


class _Mode(enum.Enum):
    PROBE = 0
    OUTPUT = 1
    CAPTURE = 2
    OWN = 3


class SharedBase(nn.Module):
    """The base layer an adapter's PEFT layer sees in the engine: it hands back rows of the step's
    shared product, or captures the rows the layer wants multiplied. Attributes it lacks (``weight``,
    ``bias``, ``in_features``, ...) are the real base module's."""

    def __init__(self, dispatch: RowDispatch) -> None:
        super().__init__()
        self.__dict__["_dispatch"] = dispatch  # not a submodule: the base belongs to the model
        self.set(mode=_Mode.OWN, expected=None, output=None, captured=None, calls=[])

    def set(self, **state) -> None:
        """Per-call state, set without ``nn.Module.__setattr__``'s bookkeeping (plain values only)."""
        self.__dict__.update(state)

    @property
    def weight(self) -> torch.Tensor:
        return self._dispatch.base.weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_dispatch"].base, name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mode = self.mode
        if mode is _Mode.OUTPUT:
            if x is not self.expected:
                raise DispatchError("a PEFT layer probed as output-side called its base layer on another input")
            return self.output
        if mode is _Mode.OWN:
            return self._dispatch.single(x)
        self.calls.append(x is self.expected)
        output = x.new_zeros(*x.shape[:-1], self._dispatch.out_features) if x.is_floating_point() else self._dispatch.single(x)
        self.set(captured=x, output=output)
        return output


@dataclass(eq=False)
class AdapterEntry:
    """One adapter's PEFT layer on one base module; ``lora``: its weights when it is plain LoRA;
    ``scale``: its vector when it is plain IA3 (the layer's own arithmetic, without its Python)."""

    layer: nn.Module
    stub: SharedBase
    side: Side
    lora: LoraWeights | None = None
    scale: torch.Tensor | None = None

    def capture(self, x: torch.Tensor) -> torch.Tensor:
        """The input the layer multiplies by the base weight for rows ``x`` (INPUT side)."""
        if self.scale is not None and x.dtype == self.scale.dtype:
            return x * self.scale
        stub = self.stub
        stub.set(mode=_Mode.CAPTURE, expected=x, calls=[])
        out = self.layer(x)
        if out is not stub.output or len(stub.calls) != 1:
            raise DispatchError("a PEFT layer probed as input-side did not return its base product unchanged")
        captured = stub.captured
        stub.set(captured=None, output=None, expected=None)
        return captured

    def apply(self, x: torch.Tensor, base_rows: torch.Tensor) -> torch.Tensor:
        """The layer's output for rows ``x`` whose base product is ``base_rows`` (OUTPUT side)."""
        if self.scale is not None and base_rows.dtype == self.scale.dtype:
            return base_rows * self.scale
        stub = self.stub
        stub.set(mode=_Mode.OUTPUT, expected=x, output=base_rows)
        try:
            return self.layer(x)
        finally:
            stub.set(expected=None, output=None)

    def own(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for rows ``x`` with a base product of its own (OWN side)."""
        self.stub.set(mode=_Mode.OWN)
        return self.layer(x)


class RowDispatch(nn.Module):
    """Stands in for base module ``base``: the base product once for all rows, each adapter on its rows.
    Attributes it lacks are the base module's.

    ``lm_head``: the module is the LM head, whose rows are the step's ``logit_groups``.
    """

    def __init__(self, base: nn.Module, *, lm_head: bool = False) -> None:
        super().__init__()
        self.base = base
        self.lm_head = lm_head
        self.fused: FusedBase | None = None
        self.entries: dict[object, AdapterEntry] = {}
        self.lora_stack = LoraStack()
        self.single = _single_product(base)
        self.out_features = _out_features(base)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the base module's attributes (weight, bias, in_features, ...)
            return getattr(self._modules["base"], name)

    def attach(self, adapter: object, layer: nn.Module) -> Side:
        """Serve ``adapter``'s PEFT ``layer`` (whose base layer is this module's base) on its rows."""
        stub = SharedBase(self)
        layer.base_layer = stub
        side = _probe(layer, stub, self.base)
        entry = AdapterEntry(layer, stub, side, plain_lora(layer) if side is Side.OUTPUT else None, plain_ia3(layer, side))
        self.entries[adapter] = entry
        self.lora_stack.clear()
        return entry.side

    def detach(self, adapter: object) -> None:
        self.entries.pop(adapter, None)
        self.lora_stack.clear()

    def active(self, step: batch.StepBatch | None) -> list[tuple[AdapterEntry, slice]]:
        """This step's adapters on this module, with their rows."""
        if not self.entries or step is None:
            return []
        groups = step.logit_groups if self.lm_head else step.groups
        return [(self.entries[g.adapter], g.rows) for g in groups if g.adapter in self.entries]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or (x.dim() == 3 and x.shape[0] == 1):
            return self._rows(x, x)
        # a model that flattens its tokens first (OPT's MLP, Qwen2-MoE's shared expert): the same rows
        return self._rows(x.reshape(1, -1, x.shape[-1]), x).reshape(*x.shape[:-1], -1)

    def _rows(self, x: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """The output for the step's rows ``x`` (``[1, N, features]``, or ``[1, N]`` token ids), ``given``
        as the module was called with (a fused op's members share a product per input tensor)."""
        step = batch.current()
        active = self.active(step)
        if active and x.shape[1] != (step.logit_groups if self.lm_head else step.groups)[-1].rows.stop:
            raise DispatchError(
                f"an adapter targets a module that sees {x.shape[1]} of the step's rows (e.g. a mixture-of-experts expert); "
                "the serving engine applies adapters only to modules that see every token"
            )
        if self.fused is not None:
            y = self.fused.output(self, x, step, given)
        elif any(entry.side is Side.INPUT for entry, _ in active):
            inputs = x.clone()
            for entry, rows in active:
                if entry.side is Side.INPUT:
                    inputs[:, rows] = entry.capture(x[:, rows])
            y = self.single(inputs)
        else:
            y = self.single(x)
        lora = [(entry.lora, rows) for entry, rows in active if entry.lora is not None]
        stacked = len(lora) > 1  # several plain LoRA groups: one pair of products for all (adapters/lora.py)
        for entry, rows in active:
            if entry.side is Side.OUTPUT and not (stacked and entry.lora is not None):
                y[:, rows] = entry.apply(x[:, rows], y[:, rows])
            elif entry.side is Side.OWN:
                y[:, rows] = entry.own(x[:, rows])
        if stacked:
            self.lora_stack.add_to(y, x, lora, step.lora_masks)
        return y

    def extra_repr(self) -> str:
        return f"{len(self.entries)} adapters"


class FusedBase:
    """A fused executor op (q/k/v, gate/up): the first member called computes every member's base
    product in one request and keeps the others' for their own calls on the same input tensor."""

    def __init__(self, remote, members: list[RowDispatch]) -> None:
        self.remote = remote
        self.members = members
        self._pending: tuple[weakref.ref, int, dict[RowDispatch, torch.Tensor]] | None = None

    def output(self, member: RowDispatch, x: torch.Tensor, step: batch.StepBatch | None, given: torch.Tensor) -> torch.Tensor:
        """``member``'s product of rows ``x``; members called with the same tensor ``given`` share one request."""
        pending = self._pending
        if pending is not None and pending[0]() is given and pending[1] == given._version and member in pending[2]:
            return pending[2].pop(member)
        outputs = self._compute(x, step)
        mine = outputs.pop(member)
        self._pending = (weakref.ref(given), given._version, outputs) if outputs else None
        return mine

    def _compute(self, x: torch.Tensor, step: batch.StepBatch | None) -> dict[RowDispatch, torch.Tensor]:
        rows = x.reshape(-1, x.shape[-1])
        count = rows.shape[0]
        extra = [
            (index, group_rows, entry.capture(x[:, group_rows]).reshape(-1, x.shape[-1]))
            for index, member in enumerate(self.members)
            for entry, group_rows in member.active(step)
            if entry.side is Side.INPUT
        ]
        full = self.remote(torch.cat([rows, *(t for _, _, t in extra)]) if extra else rows)
        products = full.split(self.remote.info.member_widths, dim=-1)  # column views: members' products never overlap
        outputs = [product[:count] for product in products]
        offset = count
        for index, group_rows, transformed in extra:
            outputs[index][group_rows] = products[index][offset : offset + transformed.shape[0]]  # steps are [1, N, ...]
            offset += transformed.shape[0]
        result = {}
        for member, y in zip(self.members, outputs, strict=True):
            if member.base.bias is not None:
                y = y + member.base.bias
            result[member] = y.view(*x.shape[:-1], y.shape[-1])
        return result


def install(model: nn.Module) -> dict[str, RowDispatch]:
    """Wrap every executor op, the input embeddings and the LM head of ``model`` in a ``RowDispatch``
    (in place); fused ops' members share one ``FusedBase``. Returns the wrappers by module path."""
    inputs, output = model.get_input_embeddings(), model.get_output_embeddings()
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), PhantomWeight) or module is inputs or module is output
    ]
    wrappers = {name: wrap(model, name) for name in targets}
    by_op = {w.base.weight.owner: w for w in wrappers.values() if isinstance(w.base.weight, PhantomWeight)}
    groups = {}
    for wrapper in wrappers.values():
        group = getattr(wrapper.base, "_group", None)
        if group is not None and all(m in by_op for m in group.members):
            groups[id(group)] = group
    for group in groups.values():
        fused = FusedBase(group.fused, [by_op[m] for m in group.members])
        for member in fused.members:
            member.fused = fused
    return wrappers


def wrap(model: nn.Module, name: str) -> RowDispatch:
    """The ``RowDispatch`` at module path ``name`` of ``model``, wrapping the module there if needed."""
    module = model.get_submodule(name)
    if isinstance(module, RowDispatch):
        return module
    wrapper = RowDispatch(module, lm_head=module is model.get_output_embeddings())
    model.set_submodule(name, wrapper)
    return wrapper


def _single_product(base: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``base``'s own product, alone: a fused op's member asks the executor for its own op only."""
    if getattr(base, "_group", None) is None:
        return base
    remote = base._remote

    def product(x: torch.Tensor) -> torch.Tensor:
        y = remote(x)
        return y if base.bias is None else y + base.bias

    return product


def plain_ia3(layer: nn.Module, side: Side) -> torch.Tensor | None:
    """The scaling vector of ``layer`` if it is a plain IA3 linear layer of one adapter that was
    probed on the side its kind implies (input for feed-forward modules, else output), else None."""
    if type(layer) is not Ia3Linear or len(layer.active_adapters) != 1 or layer.merged or layer.disable_adapters:
        return None
    name = layer.active_adapters[0]
    if name not in layer.ia3_l or side is not (Side.INPUT if layer.is_feedforward else Side.OUTPUT):
        return None
    return layer.ia3_l[name].detach().flatten()


def _out_features(base: nn.Module) -> int:
    if isinstance(base, nn.Embedding):
        return base.embedding_dim
    if isinstance(base, Conv1D):
        return base.nf
    return base.weight.shape[0]


def _in_features(base: nn.Module) -> int:
    return base.weight.shape[0] if isinstance(base, Conv1D) else base.weight.shape[1]


@torch.no_grad()
def _probe(layer: nn.Module, stub: SharedBase, base: nn.Module) -> Side:
    """Call ``layer`` once on a probe input and see how it calls its base layer."""
    weight = base.weight
    if isinstance(base, nn.Embedding):
        x = torch.arange(min(2, base.num_embeddings), device=weight.device)[None]
    else:
        x = torch.randn(1, 2, _in_features(base), dtype=weight.dtype, device=weight.device)
    stub.set(mode=_Mode.PROBE, expected=x, calls=[])
    try:
        out = layer(x)
    finally:
        stub.set(expected=None)
    calls = stub.calls
    stub.set(captured=None)
    if calls == [True]:
        return Side.OUTPUT
    if calls == [False] and out is stub.output:
        return Side.INPUT
    return Side.OWN
