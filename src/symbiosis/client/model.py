"""Building a client: a genuine transformers causal LM whose frozen linear ops run on the executor."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from ..errors import BaseWeightAccessError, UnsupportedFeatureError
from ..protocol import ModelSpec, OpKind, config_from_spec, resolve_dtype
from ..transport import Transport, connect
from .parallel import exclude_base_from_ddp
from .phantom import PhantomWeight
from .proxies import EmbeddingProxy, connect_embedding, connect_linear, make_proxy
from .remote_ops import FusionGroup, RemoteLinear
from .session import ClientSession

Placement = Literal["client", "executor"]


def load_model(
    executor: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    priority: int | str | None = None,
    embeddings: Placement = "client",
    lm_head: Placement = "executor",
    attn_implementation: str | None = None,
    client_id: str | None = None,
    token: str | None = None,
    connect_options: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A causal LM whose frozen linear ops are proxies to ``executor``; everything else is local.

    ``executor``: a ``BaseExecutor`` in this process (itself a ``Transport``), another ``Transport``,
    an executor server's address (``"symbiosis://host:port"``, ``"symbiosis+tls://host:port"``) or a
    list of addresses of a sharded base; ``token`` authenticates with the server and
    ``connect_options`` go to ``symbiosis.transport.connect`` (e.g. ``tls_ca``, ``shared_memory``).
    ``device`` / ``dtype``: where and in which dtype this client keeps its frozen tensors and runs
    attention, norms and its KV cache (dtype defaults to the executor's).
    ``priority``: ``"auto"`` (default: generation and evaluation are inference, training is
    fine-tuning), ``"inference"``, ``"training"`` or an int (0 is most urgent).
    ``embeddings``: ``"client"`` (default) keeps the token-embedding table here, so token ids never
    leave the client; ``"executor"`` saves its memory but sends token ids.
    ``lm_head``: ``"executor"`` (default) runs the LM head as one large GEMM shared by all clients,
    so the executor computes the logits; ``"client"`` keeps a local copy and logits private.

    The returned model starts in eval mode with every parameter frozen, like ``from_pretrained``.
    """
    if embeddings not in ("client", "executor") or lm_head not in ("client", "executor"):
        raise ValueError("embeddings and lm_head must each be 'client' or 'executor'")
    transport = connect(executor, token=token, **(connect_options or {}))
    spec = transport.spec()
    config = config_from_spec(spec)
    torch_dtype = resolve_dtype(dtype or spec.dtype)
    device = torch.device(device)
    session = ClientSession(transport, client_id=client_id, priority=priority)

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)
    remote = _remote_module_names(model, spec, embeddings=embeddings, lm_head=lm_head)
    _install_proxies(model, spec, session, remote, device)
    _load_frozen_tensors(model, transport, torch_dtype, device)
    _drop_ties_to_executor(model, remote)
    if spec.generation_config is not None:
        model.generation_config = GenerationConfig.from_dict(spec.generation_config)
    model.requires_grad_(False).eval()
    exclude_base_from_ddp(model)
    model.symbiosis = session
    model.save_pretrained = _refuse_to_save_base
    return model


def _refuse_to_save_base(*args: Any, **kwargs: Any) -> None:
    """Saving a client would write a checkpoint without its base weights: refuse instead."""
    raise BaseWeightAccessError(
        "a Symbiosis client holds no base weights, so it cannot save a full model: save the adapter "
        "(PeftModel.save_pretrained) — the base is the executor's model directory"
    )


def _remote_module_names(model: PreTrainedModel, spec: ModelSpec, *, embeddings: Placement, lm_head: Placement) -> set[str]:
    """Module paths that become proxies, per the placement options."""
    names = {name for name, info in spec.ops.items() if info.kind is OpKind.LINEAR and not info.members}
    modules = dict(model.named_modules())
    missing = sorted(n for n in names if n not in modules)
    if missing:
        raise UnsupportedFeatureError(f"the executor serves ops this client model lacks: {missing[:5]}")
    output = model.get_output_embeddings()
    if lm_head == "client" and output is not None:
        names -= {n for n, m in modules.items() if m is output}
    if embeddings == "executor":
        names |= {name for name, info in spec.ops.items() if info.kind is OpKind.EMBEDDING}
    return names


def _install_proxies(model: nn.Module, spec: ModelSpec, session: ClientSession, remote: set[str], device: torch.device) -> None:
    """Replace each module in ``remote`` by a proxy on ``device`` wired to its executor op."""
    groups = {
        leader: FusionGroup(RemoteLinear(session, spec.ops[fused]))
        for leader, fused in spec.fusion_groups.items()
        if all(m in remote for m in spec.ops[fused].members)
    }
    member_of = {m: group for group in groups.values() for m in group.members[1:]}
    for name in sorted(remote):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        proxy = make_proxy(getattr(parent, attr), name, device)
        info = spec.ops[name]
        if isinstance(proxy, EmbeddingProxy):
            connect_embedding(proxy, session, info)
        elif name in groups:
            connect_linear(proxy, RemoteLinear(session, info), groups[name], "leader")
        elif name in member_of:
            connect_linear(proxy, RemoteLinear(session, info), member_of[name], "member")
        else:
            connect_linear(proxy, RemoteLinear(session, info), None, "single")
        setattr(parent, attr, proxy)


def _load_frozen_tensors(model: nn.Module, transport: Transport, dtype: torch.dtype, device: torch.device) -> None:
    """Fill every parameter and buffer of the client (proxies' phantom weights aside) with the executor's values.

    All of them, not only those left on the meta device: a model may create tensors at init that
    escape the meta context (e.g. ``torch.normal`` with float arguments) and would otherwise keep
    random values. Parameters take the client's dtype; buffers keep theirs (as ``from_pretrained``
    leaves e.g. rotary frequencies in float32). Tensors tied in the model stay tied. Every tensor is
    a copy: a client can never modify the executor's.
    """
    slots: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    names: dict[int, str] = {}
    for module_name, module in model.named_modules():
        for is_param, table in ((True, module._parameters), (False, module._buffers)):
            for key, tensor in table.items():
                if tensor is not None and not isinstance(tensor, PhantomWeight):
                    slots.setdefault(id(tensor), []).append((module, key, is_param))
                    names.setdefault(id(tensor), f"{module_name}.{key}" if module_name else key)
    fetched = transport.tensors(names.values())
    for tensor_id, places in slots.items():
        value = fetched[names[tensor_id]]
        is_param = places[0][2]
        target_dtype = dtype if is_param and value.is_floating_point() else value.dtype
        value = value.to(device=device, dtype=target_dtype, copy=True)
        shared = nn.Parameter(value, requires_grad=False) if is_param else value
        for module, key, _ in places:
            (module._parameters if is_param else module._buffers)[key] = shared


def _drop_ties_to_executor(model: PreTrainedModel, remote: set[str]) -> None:
    """Forget weight ties that involve a proxy: its weight is the executor's, never a local tensor."""
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    model.all_tied_weights_keys = {
        target: source
        for target, source in ties.items()
        if target.rpartition(".")[0] not in remote and source.rpartition(".")[0] not in remote
    }
