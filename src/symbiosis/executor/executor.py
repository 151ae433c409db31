"""The base executor: one frozen copy of a causal LM's linear ops, shared by every client."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..errors import BadRequestError
from ..protocol import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    PRECISION_BITS,
    Direction,
    ModelSpec,
    OpInfo,
    OpKind,
    OpRequest,
    TensorInfo,
    dtype_name,
    resolve_dtype,
)
from .discovery import find_fusion_groups, find_linear_ops, linear_weight
from .ops import PACKED_DIRECTIONS, FrozenOp, Packing
from .quantized import QuantizedOp, from_conv1d, is_quantized_linear, load_options, prepare_quantized_base
from .scheduler import BatchScheduler, Completion
from .sharding import owned_ops
from .stats import BatchStats

log = logging.getLogger(__name__)

_FLOAT_DTYPES = frozenset(FLOAT_DTYPES.values())
#: Per thread: ``count``, the intra-op thread count this module last applied there; ``own``, the count
#: the thread's own computation runs with (``set_own_thread_count``), when it set one.
_THREAD = threading.local()
#: Where a submitted request's output goes: a tensor, or ``(shape, dtype) -> tensor`` (see ``submit``).
OutputBuffer = torch.Tensor | Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class BaseExecutor:
    """Holds the single copy of a model's frozen linear ops and serves batched op requests.

    Stateless with respect to clients: a request is "multiply these rows by W" (forward) or "by W
    transposed" (backward); no activation is stored and no weight gradient is computed. The
    executor also hands clients the model config and the small frozen tensors (norms, embeddings,
    rotary buffers, biases) they need to run everything else locally.

    Options: ``fuse`` (serve ops that share an input as one fused op; default on), ``max_rows``
    (rows per GEMM), ``max_wait_s`` (wait up to this long for a batch to fill while active clients
    are still on their way to it — see ``executor.scheduler``; default 0: never wait),
    ``active_window_s`` (a client idle this long no longer holds back a filling batch; default 0.25),
    ``aging_s`` (how long a lower-priority request waits before it outranks a new urgent one),
    ``batch_credit_s`` (each extra request waiting for an op makes it as urgent as if it had
    arrived this much earlier), ``inference_lane`` (inference requests are batched and run
    concurrently with, never behind, lower-priority GEMMs; default on),
    ``max_request_rows`` (refuse larger requests), ``reject_non_finite`` (refuse forward inputs with NaN/Inf; checked once per batch,
    and a failing batch is re-run request by request so only the culprit fails; backward inputs are
    not checked because mixed-precision loss scaling relies on overflowing gradients reaching the
    client, and rows never mix, so they harm no one else),
    ``layers`` (``(start, end)``: keep only the ops of layers [start, end), one shard of a sharded
    base; ownership rule in ``executor.sharding``; frozen tensors are all kept).

    ``pack_weights``: keep a copy of each dense CPU linear weight (float32 or bfloat16) in oneDNN's
    blocked layout for forward products (``True`` or ``"forward"``), which it computes 1.5–2.3x
    faster than MKL's GEMM for 1–256 rows, or a copy for each direction (``"both"``: backward
    products 1.1–1.3x faster at 512 rows) (``FrozenOp.pack``); casts and a fused op's members
    alone use the plain weights. Each copy costs the linear weights' bytes again (``parameter_bytes``).

    Products run with ``torch.get_num_threads()`` intra-op threads as it was when the executor was
    built (``threads``), on whichever thread computes them (``set_own_thread_count``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        generation_config: GenerationConfig | None = None,
        fuse: bool = True,
        max_rows: int | None = None,
        max_wait_s: float = 0.0,
        aging_s: float = 0.02,
        batch_credit_s: float = 0.005,
        inference_lane: bool = True,
        max_request_rows: int | None = None,
        reject_non_finite: bool = True,
        layers: tuple[int, int] | None = None,
        active_window_s: float | None = None,
        pack_weights: bool | Packing = False,
    ) -> None:
        if not (isinstance(pack_weights, bool) or pack_weights in tuple(PACKED_DIRECTIONS)):
            raise ValueError(f"pack_weights must be True, False or one of {tuple(PACKED_DIRECTIONS)}, not {pack_weights!r}")
        self.quantization = prepare_quantized_base(model)  # "int8", "nf4", "fp4" or None (dense)
        model.eval().requires_grad_(False)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.threads = torch.get_num_threads()
        self.device = next(model.parameters()).device
        self.max_request_rows = max_request_rows
        self.reject_non_finite = reject_non_finite
        self._config = model.config.to_dict()
        self._config.pop("quantization_config", None)  # clients hold no base weights, quantized or not
        self._generation_config = (generation_config or model.generation_config or GenerationConfig()).to_dict()
        modules = find_linear_ops(model)
        groups = find_fusion_groups(model, modules) if fuse else []
        self.layer_range = layers
        owned = owned_ops(list(modules), layers) if layers is not None else set(modules)
        self._ops: dict[str, FrozenOp] = {}
        self._fusion_groups: dict[str, str] = {}
        self._add_linear_ops({n: m for n, m in modules.items() if n in owned}, [g for g in groups if owned.issuperset(g)])
        if layers is None or layers[0] == 0:
            self._add_embedding_op(model)
        if pack_weights:
            directions = PACKED_DIRECTIONS["forward" if pack_weights is True else pack_weights]
            members = {member for op in self._ops.values() for member in op.info.members}
            for name, op in self._ops.items():
                if isinstance(op, FrozenOp) and name not in members:
                    op.pack(directions)
        self._tensors = self._frozen_tensors(model, modules)
        self.stats = BatchStats()
        self._staging: list[_Staging] = []  # one per combiner that ever ran at once (at most one per lane)
        self._scheduler = BatchScheduler(
            self._run_batch,
            self.stats,
            max_rows=max_rows,
            max_wait_s=max_wait_s,
            aging_s=aging_s,
            batch_credit_s=batch_credit_s,
            inference_lane=inference_lane,
            active_window_s=active_window_s,
        )

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        quantization: str | BitsAndBytesConfig | None = None,
        **options: Any,
    ) -> BaseExecutor:
        """Load a causal LM from a local Hugging Face directory through transformers' own loading.

        ``quantization`` (``"int8"``, ``"nf4"`` / ``"4bit"``, ``"fp4"`` or a ``BitsAndBytesConfig``) holds
        the linear ops quantized by bitsandbytes, as a QLoRA user's model does (``executor.quantization``):
        4-bit products run in ``dtype``, int8 ones in the dtype of the requests, dense weights are float32.
        A checkpoint saved quantized by bitsandbytes loads quantized without it.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        torch_dtype = resolve_dtype(dtype)
        extra = load_options(path, quantization, torch_dtype) if quantization is not None else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=str(torch.device(device)), **extra)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        return cls(model, generation_config=generation_config, **options)

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        *,
        seed: int = 0,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        **options: Any,
    ) -> BaseExecutor:
        """Build a causal LM with random weights (seeded) from a transformers config, for tests and benchmarks."""
        torch_dtype = resolve_dtype(dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        return cls(model.to(device), **options)

    def _add_linear_ops(self, modules: dict[str, nn.Module], groups: list[tuple[str, ...]]) -> None:
        self._conv1d = {name for name, module in modules.items() if isinstance(module, Conv1D) or from_conv1d(module)}
        for name, module in modules.items():
            if is_quantized_linear(module):
                self._ops[name] = QuantizedOp.of(OpInfo(name, OpKind.LINEAR, module.in_features, module.out_features), module)
                continue
            weight = linear_weight(module)
            self._ops[name] = FrozenOp(OpInfo(name, OpKind.LINEAR, weight.shape[1], weight.shape[0]), weight)
        for members in groups:
            ops = [self._ops[m] for m in members]
            widths = tuple(op.info.out_features for op in ops)
            name = fused_op_name(members)
            info = OpInfo(name, OpKind.LINEAR, ops[0].info.in_features, sum(widths), members, widths)
            if all(isinstance(op, QuantizedOp) for op in ops):
                self._ops[name] = QuantizedOp.fused(info, ops)  # it holds the members' own quantized weights
            elif any(isinstance(op, QuantizedOp) for op in ops):
                continue  # quantized and dense members: served one by one
            else:
                fused = torch.cat([op.weight for op in ops])
                self._ops[name] = FrozenOp(info, fused)
                # members become row views of the fused weight, so the fused copy is the only copy
                for member, rows in zip(members, fused.split(widths), strict=True):
                    self._ops[member] = FrozenOp(self._ops[member].info, rows)
            self._fusion_groups[members[0]] = name

    def _add_embedding_op(self, model: PreTrainedModel) -> None:
        embedding = model.get_input_embeddings()
        name = next(n for n, m in model.named_modules() if m is embedding)
        weight = embedding.weight
        self._ops[name] = FrozenOp(OpInfo(name, OpKind.EMBEDDING, 1, weight.shape[1]), weight)

    def _frozen_tensors(self, model: PreTrainedModel, ops: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Every parameter and buffer except the linear ops' weights (biases stay: clients add them)."""
        op_weights = {f"{name}.weight" for name in ops}
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        return {name: t.detach() for name, t in tensors.items() if name not in op_weights}

    # ----------------------------------------------------------------------------- client setup
    def spec(self) -> ModelSpec:
        """The config and the op and tensor tables a client needs to build its model."""
        return ModelSpec(
            config=dict(self._config),
            generation_config=dict(self._generation_config),
            dtype=dtype_name(self.dtype),
            device=str(self.device),
            ops={name: op.info for name, op in self._ops.items()},
            fusion_groups=dict(self._fusion_groups),
            tensors={name: TensorInfo(tuple(t.shape), dtype_name(t.dtype)) for name, t in self._tensors.items()},
            layer_range=self.layer_range,
        )

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Copies of the named frozen tensors (on the executor's device and dtype), the caller's to keep or modify.

        Besides the spec's tensor table, ``<op>.weight`` of a single linear op can be fetched, in its
        module's own layout: a client that keeps e.g. the LM head locally needs it.
        """
        return {name: self._frozen(name).clone() for name in names}

    def _frozen(self, name: str) -> torch.Tensor:
        """The executor's own tensor ``name`` (never handed out: ``tensors`` copies it)."""
        if name in self._tensors:
            return self._tensors[name]
        op = self._ops.get(name.removesuffix(".weight"))
        if not name.endswith(".weight") or op is None or op.info.members or op.info.kind is not OpKind.LINEAR:
            raise BadRequestError(f"unknown frozen tensor {name!r}")
        return op.weight.t() if op.info.name in self._conv1d else op.weight

    # ---------------------------------------------------------------------------------- serving
    def run(self, request: OpRequest) -> torch.Tensor:
        """Validate ``request``, batch it with concurrent requests for the same op, return its output.

        Raises ``BadRequestError`` in the caller for an unknown op, a wrong shape or dtype, or
        non-finite values; nothing else is affected.
        """
        self.validate(request)
        return self._scheduler.run(request)

    def submit(self, request: OpRequest, on_done: Completion, *, out: OutputBuffer | None = None, validated: bool = False) -> None:
        """Validate ``request`` and queue it without waiting; ``on_done(output, error)`` is called
        once it is computed, in whichever thread computes it (possibly this one, before ``submit``
        returns).

        ``out``: where the output must be written — a tensor of the output's shape and dtype, or a
        callable ``(shape, dtype) -> tensor`` that provides one (and may raise to refuse the
        request, e.g. an output too large for a shared-memory channel); the output passed to
        ``on_done`` is then that tensor. Raises ``BadRequestError`` (nothing queued) for a request
        ``validate`` refuses. ``validated``: ``validate`` accepted this very request before and it has
        not changed since except in the values of its float rows (``out`` is then a tensor).
        """
        if not validated:
            shape, dtype = self.validate(request)
            if callable(out):
                out = out(shape, dtype)
        self._scheduler.submit(request, on_done, out)

    def validate(self, request: OpRequest) -> tuple[tuple[int, ...], torch.dtype]:
        """Raise ``BadRequestError`` unless ``request`` is well-formed for its op; return the shape and
        dtype of its output.

        A ``compute_dtype`` equal to the executor's dtype is dropped, and so is a ``weight_dtype`` that
        rounds nothing (the weight already in it, or a wider one), so such requests batch with those
        that name none.
        """
        op = self._ops.get(request.op)
        if op is None:
            raise BadRequestError(f"unknown op {request.op!r}")
        info = op.info
        if not isinstance(request.direction, Direction):
            raise BadRequestError(f"unknown direction {request.direction!r}")
        x = request.x
        if not isinstance(x, torch.Tensor):
            raise BadRequestError(f"op {info.name}: input must be a tensor, got {type(x).__name__}")
        if info.kind is OpKind.EMBEDDING:
            self._validate_ids(info, request)
            dtype = request.out_dtype or self.dtype
        else:
            self._validate_rows(info, request)
            dtype = request.out_dtype or x.dtype
        if request.compute_dtype == self.dtype:
            request.compute_dtype = None
        if request.weight_dtype is not None and PRECISION_BITS.get(request.weight_dtype, 0) >= PRECISION_BITS[self.dtype]:
            request.weight_dtype = None
        rows = request.rows
        if self.max_request_rows is not None and rows > self.max_request_rows:
            raise BadRequestError(f"op {info.name}: {rows} rows exceed the limit of {self.max_request_rows}")
        return (rows, info.output_width(request.direction, request.features)), dtype

    def _validate_rows(self, info: OpInfo, request: OpRequest) -> None:
        features = request.features
        if features is not None and not (
            isinstance(features, tuple) and len(features) == 2 and 0 <= features[0] < features[1] <= info.out_features
        ):
            raise BadRequestError(f"op {info.name}: features must be [start, end) within [0, {info.out_features}), got {features!r}")
        x, width = request.x, info.expected_width(request.direction, features)
        if x.dim() != 2 or x.shape[1] != width:
            raise BadRequestError(
                f"op {info.name} ({request.direction.name.lower()}): expected rows of width {width}, "
                f"got shape {tuple(x.shape)}"
            )
        for what, dtype in (
            ("dtype", x.dtype),
            ("out_dtype", request.out_dtype),
            ("compute_dtype", request.compute_dtype),
            ("weight_dtype", request.weight_dtype),
        ):
            if dtype is not None and dtype not in _FLOAT_DTYPES:
                raise BadRequestError(f"op {info.name}: {what} {dtype} is not one of {', '.join(FLOAT_DTYPES)}")

    def _validate_ids(self, info: OpInfo, request: OpRequest) -> None:
        x = request.x
        if request.direction is not Direction.FORWARD:
            raise BadRequestError(f"op {info.name}: embeddings are frozen and have no backward")
        if request.compute_dtype is not None or request.weight_dtype is not None or request.features is not None:
            raise BadRequestError(f"op {info.name}: an embedding lookup takes no compute_dtype, weight_dtype or features")
        if x.dim() != 1 or x.dtype not in INDEX_DTYPES:
            raise BadRequestError(f"op {info.name}: expected a 1-D tensor of token ids, got {x.dtype} {tuple(x.shape)}")
        vocab = self._ops[info.name].weight.shape[0]
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise BadRequestError(f"op {info.name}: token ids must lie in [0, {vocab})")
        if request.out_dtype is not None and request.out_dtype not in _FLOAT_DTYPES:
            raise BadRequestError(f"op {info.name}: out_dtype {request.out_dtype} is not a float dtype")

    def _run_batch(
        self, op_name: str, direction: Direction, requests: Sequence[OpRequest], outs: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """One GEMM over all requests' rows; each output goes where its request wants it.

        A request with a destination in ``outs`` gets its output written there (the GEMM writes
        straight into it when it is alone and the destination fits the product); the others get
        their own rows in their dtype and on their device. Runs without autograd, whatever the
        calling thread's grad mode (a combiner computes other clients' requests too).
        """
        if getattr(_THREAD, "count", None) != self.threads:
            _apply_thread_count(self.threads)
        try:
            if torch.is_grad_enabled() and any(r.x.requires_grad for r in requests):
                with torch.no_grad():
                    return self._compute(op_name, direction, requests, outs)
            return self._compute(op_name, direction, requests, outs)  # nothing to record: no mode switch
        finally:
            own = getattr(_THREAD, "own", None)
            if own is not None and own != self.threads:
                _apply_thread_count(own)

    def _compute(
        self, op_name: str, direction: Direction, requests: Sequence[OpRequest], outs: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """``_run_batch``'s work, on inputs autograd does not track."""
        op = self._ops[op_name]
        linear = op.info.kind is OpKind.LINEAR
        first = requests[0]
        # every request of a batch asks for the same product (the scheduler's batch key)
        compute = (first.compute_dtype or self.dtype) if linear else None
        check = self.reject_non_finite and linear and direction is Direction.FORWARD
        if len(requests) == 1:
            x = _moved(first.x, self.device, compute)
            total = x.sum(dtype=torch.float32) if check else None  # read after the GEMM: one device sync
            out = outs[0]
            direct = out is not None and _writable_by(out, self.device, compute or op.weight.dtype)
            y = op.apply(direction, x, features=first.features, weight_dtype=first.weight_dtype, out=out if direct else None)
            if total is not None:
                self._check_finite(total, requests, op_name)
            if out is None:
                return [_deliver(y, first)]
            if not direct:
                out.copy_(y, non_blocking=True)
            self._finish_copies(outs)
            return [out]
        staging = self._staging.pop() if self._staging else _Staging(self.device)
        try:
            x = self._gather(requests, compute, staging)
            total = x.sum(dtype=torch.float32) if check else None
            copied = all(out is not None for out in outs)
            reused = None  # every output is copied out: compute into reused memory, unless the kernel allocates anyway
            if copied and not (isinstance(op, FrozenOp) and op.uses_packed(direction, x.dtype, first.features, first.weight_dtype)):
                reused = staging.output(x.shape[0], op.info.output_width(direction, first.features), compute or op.weight.dtype)
            y = op.apply(direction, x, features=first.features, weight_dtype=first.weight_dtype, out=reused)
            if total is not None:
                self._check_finite(total, requests, op_name)
            if copied:  # one call copies every request's rows to its destination
                outputs = list(outs)
                torch._foreach_copy_(outputs, y.split([r.rows for r in requests]), non_blocking=True)
                self._finish_copies(outs)
                return outputs
            outputs, start = [], 0
            for request, out in zip(requests, outs, strict=True):
                rows = request.rows
                if out is None:
                    outputs.append(_deliver(_own_rows(y, start, rows), request))
                else:
                    outputs.append(out.copy_(y[start : start + rows], non_blocking=True))
                start += rows
            self._finish_copies(outs)
            return outputs
        finally:
            self._staging.append(staging)

    def _gather(self, requests: Sequence[OpRequest], compute: torch.dtype | None, staging: _Staging) -> torch.Tensor:
        """The rows of a batch of several requests, on the executor's device and (linear ops) in the compute dtype."""
        xs = [r.x for r in requests]
        dtype = compute or xs[0].dtype
        rows = sum(x.shape[0] for x in xs)
        x = staging.input(rows, *xs[0].shape[1:], dtype=dtype)
        if all(t.device == self.device and t.dtype == dtype for t in xs):
            return torch.cat(xs, out=x)
        start = 0
        for t in xs:
            x[start : start + t.shape[0]].copy_(t, non_blocking=True)
            start += t.shape[0]
        return x

    def _check_finite(self, total: torch.Tensor, requests: Sequence[OpRequest], op_name: str) -> None:
        """Raise ``BadRequestError`` if a request's input has NaN or Inf.

        ``total`` is the float32 sum of the batch's rows (NaN and Inf propagate through it; one
        reduction for the whole batch, ~100x cheaper than an element-wise check on CPU); only when
        it is not finite — NaN/Inf, or finite values whose sum overflows, or values that overflowed
        in the cast to the compute dtype — does an element-wise check of the inputs as sent decide.
        """
        if math.isfinite(float(total)) or all(bool(torch.isfinite(r.x).all()) for r in requests):
            return
        culprit = requests[0].client_id if len(requests) == 1 else "a client in this batch"
        raise BadRequestError(f"op {op_name} (forward): input of {culprit} has NaN or Inf values")

    def _finish_copies(self, outs: Sequence[torch.Tensor | None]) -> None:
        """Wait for device-to-host copies into destinations in host memory (their readers are other
        processes that do not follow this device's streams)."""
        if self.device.type == "cuda" and any(out is not None and out.device.type == "cpu" for out in outs):
            torch.cuda.current_stream(self.device).synchronize()

    # ------------------------------------------------------------------------------ management
    def queue_depth(self) -> int:
        """Requests waiting for the executor right now."""
        return self._scheduler.queue_depth()

    def close(self) -> None:
        """Refuse new requests (queued ones still complete)."""
        self._scheduler.close()

    def parameter_bytes(self) -> int:
        """Bytes of frozen weights held (each storage counted once, packed copies included)."""
        seen, total = set(), 0
        for t in [t for op in self._ops.values() for t in op.held_tensors()] + list(self._tensors.values()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total + sum(op.packed_bytes for op in self._ops.values() if isinstance(op, FrozenOp))

    def __repr__(self) -> str:
        linear = sum(op.info.kind is OpKind.LINEAR and not op.info.members for op in self._ops.values())
        return (
            f"BaseExecutor({self._config.get('model_type')}, {linear} linear ops, "
            f"{len(self._fusion_groups)} fused groups, dtype={dtype_name(self.dtype)}, "
            f"{f'quantization={self.quantization}, ' if self.quantization else ''}device={self.device}, "
            f"{self.parameter_bytes() / 2**20:.1f} MiB)"
        )


class _Staging:
    """Reusable buffers of one combiner for a batch's gathered input rows and its output (before
    they are copied to their destinations): batches allocate nothing once the largest has run."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._buffers = [torch.empty(0, dtype=torch.uint8, device=device), torch.empty(0, dtype=torch.uint8, device=device)]

    def input(self, rows: int, *rest: int, dtype: torch.dtype) -> torch.Tensor:
        return self._view(0, (rows, *rest), dtype)

    def output(self, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        return self._view(1, (rows, width), dtype)

    def _view(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._buffers[index].numel() < nbytes:
            self._buffers[index] = torch.empty(1 << max(nbytes - 1, 1).bit_length(), dtype=torch.uint8, device=self._device)
        return self._buffers[index][:nbytes].view(dtype).view(shape)


def set_own_thread_count(count: int) -> None:
    """Run the calling thread's own computation with ``count`` intra-op threads; executor products it
    computes still run with their executor's ``threads`` (switched around each batch, 0.1 µs a switch).

    The serving engine's thread uses this: its model code, adapters and attention are small products
    that a team of threads slows down, while the base GEMMs gain from every core (measured at 16
    clients on the base: 216–224 tokens/s against 199–208 with two threads for everything).
    """
    _apply_thread_count(count)
    _THREAD.own = count


def _apply_thread_count(count: int) -> None:
    """``torch.set_num_threads`` for the calling thread: OpenMP's and MKL's counts are per thread, and a
    thread Python starts has the libraries' defaults (one thread per core) until a count is applied
    there (measured: a 16x64x64 product took 21 µs instead of 3 in a server started with
    ``--threads 1``, and the team's spinning worker held a core). torch also keeps ``count`` as the
    process's default, which ``torch.get_num_threads()`` reports."""
    torch.set_num_threads(count)
    _THREAD.count = count


def _writable_by(out: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a product on ``device`` in ``dtype`` can be written straight into ``out``."""
    return out.device == device and out.dtype == dtype and out.is_contiguous()


def fused_op_name(members: Sequence[str]) -> str:
    """``a.b.q_proj``, ``a.b.k_proj`` -> ``a.b.(q_proj+k_proj)``: the common module prefix, then the members."""
    prefix = members[0]
    while prefix and not all(m.startswith(prefix + ".") for m in members):
        prefix = prefix.rpartition(".")[0]
    start = len(prefix) + 1 if prefix else 0
    return f"{prefix}{'.' if prefix else ''}({'+'.join(m[start:] for m in members)})"


def _deliver(rows: torch.Tensor, request: OpRequest) -> torch.Tensor:
    """``rows`` in the requester's dtype (its input's, unless it asked for another) and on its device."""
    dtype = request.out_dtype or (request.x.dtype if request.x.is_floating_point() else rows.dtype)
    return _moved(rows, request.x.device, dtype)


def _moved(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` in ``dtype`` (default: its own); ``t`` itself when it is already there.

    Equal to ``t.to(device, dtype)``, without a dispatcher round trip for the common no-op case.
    """
    if t.device == device and (dtype is None or t.dtype == dtype):
        return t
    return t.to(device, dtype or t.dtype)


def _own_rows(y: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows ``[start, start+rows)`` of ``y`` as a tensor with its own autograd version counter.

    A plain slice would share ``y``'s version counter with every other client's slice, so one
    client's in-place update would break another client's backward pass. The row ranges never
    overlap, so sharing the storage is safe.
    """
    if start == 0 and rows == y.shape[0]:
        return y
    out = torch.empty(0, dtype=y.dtype, device=y.device)
    width = math.prod(y.shape[1:])
    return out.set_(y.untyped_storage(), y.storage_offset() + start * width, (rows, *y.shape[1:]), y.stride())
