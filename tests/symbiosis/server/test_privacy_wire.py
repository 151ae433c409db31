"""The privacy contract, checked on the wire.

A client fine-tunes (LoRA, AdamW) and generates through recording proxies (of the gRPC port and of
the TCP data channel's port); on the shared-memory path every call message it sends and everything
it writes into shared memory is recorded too. Each lane is checked: shared memory, TCP data
channel, gRPC stream. Then the exact byte patterns of its
adapter weights (as used in every step), adapter gradients, optimizer state, KV cache and token
ids are searched in everything it sent. Positive controls show that the search does find what
does travel: op inputs (activations), and token ids when embeddings are placed on the executor.

One exact overlap is inherent to splitting at the linear ops and documented in
docs/architecture-service.md: at the first position of a sequence attention attends only to
itself, so the input of ``o_proj`` there *is* that position's value vectors. The test checks that
this is the only KV-cache content that appears, and that it does appear (so the claim is exact).

Bytes are not information: the documented inferences an executor holding the base can make from
what it receives (labels from the LM head's gradient, token ids from the first layer's input) are
checked too, so that the contract states them exactly.
"""

from __future__ import annotations

import socket

import pytest
import torch
from peft import LoraConfig, get_peft_model

from symbiosis import load_model
from symbiosis.protocol import Direction, OpRequest
from symbiosis.transport import RemoteTransport, lanes

from .capture import RecordingProxy, grpc_messages
from .servers import LANES

WINDOW = 4  # elements per searched pattern: 16 bytes of float32, 32 bytes of int64


def patterns(t: torch.Tensor, count: int = 24) -> list[bytes]:
    """Byte patterns of ``WINDOW`` consecutive elements of ``t``, spread over it (skipping zeros)."""
    flat = t.detach().contiguous().reshape(-1).cpu()
    out = []
    step = max(1, (flat.numel() - WINDOW) // count)
    for start in range(0, flat.numel() - WINDOW + 1, step):
        window = flat[start : start + WINDOW]
        if bool((window != 0).all()):
            out.append(window.numpy().tobytes())
    return out


def found(tensors: dict[str, torch.Tensor], haystack: bytes) -> list[str]:
    return [name for name, t in tensors.items() if any(p in haystack for p in patterns(t))]


@pytest.fixture
def shm_recorder(monkeypatch):
    """Records every message sent on a shared-memory channel's socket in this process (the calls
    exactly as sent) and the tensor bytes of every shared-memory call, as the server reads them."""
    recorded: list[bytes] = []
    original_call, original_send = lanes.ShmLane.call, socket.socket.send

    def send(self, data, *args):
        if self.family == socket.AF_UNIX and self.type == socket.SOCK_SEQPACKET:
            recorded.append(bytes(data))
        return original_send(self, data, *args)

    def call(self, request, call_id):
        out = original_call(self, request, call_id)
        nbytes = request.x.numel() * request.x.element_size()
        recorded.append(self._requests.memory[:nbytes].numpy().tobytes())
        return out

    monkeypatch.setattr(socket.socket, "send", send)
    monkeypatch.setattr(lanes.ShmLane, "call", call)
    return recorded


def run_client(url: str, *, options: dict, embeddings: str = "client"):
    """Fine-tune three AdamW steps and generate; return what must stay private and what must travel."""
    torch.manual_seed(0)
    client = load_model(url, embeddings=embeddings, connect_options=options)
    model = get_peft_model(client, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    private: dict[str, torch.Tensor] = {}
    travelled: dict[str, torch.Tensor] = {}
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj.base_layer
    down = model.base_model.model.model.layers[1].mlp.down_proj.base_layer

    def keep_input(name: str):
        def hook(_module, args, _output) -> None:
            travelled.setdefault(name, args[0].detach().clone())

        return hook

    hooks = [o_proj.register_forward_hook(keep_input("o_proj input")), down.register_forward_hook(keep_input("down_proj input"))]
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        ids = torch.randint(3, 250, (2, 12), generator=generator)
        private.update({f"step{step} weight {n}": p.detach().clone() for n, p in params.items()})
        private[f"step{step} token ids"] = ids
        private[f"step{step} token ids int32"] = ids.int()
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        private.update({f"step{step} grad {n}": p.grad.clone() for n, p in params.items()})
        optimizer.step()
        optimizer.zero_grad()
        for n, p in params.items():
            state = optimizer.state[p]
            private[f"step{step} exp_avg {n}"] = state["exp_avg"].clone()
            private[f"step{step} exp_avg_sq {n}"] = state["exp_avg_sq"].clone()
    for hook in hooks:
        hook.remove()
    model.eval()
    prompt = torch.randint(3, 250, (1, 6), generator=generator)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    private["prompt ids"] = prompt
    private["generated ids"] = out.sequences
    cache = out.past_key_values
    kv_first: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(cache.layers):
        private[f"kv keys layer {index}"] = layer.keys
        private[f"kv values layer {index} positions 1+"] = layer.values[:, :, 1:]
        kv_first[f"kv values layer {index} position 0"] = layer.values[:, :, :1]
    return private, travelled, kv_first, model


@pytest.mark.parametrize("lane", sorted(LANES))
def test_nothing_private_leaves_the_client(served, shm_recorder, lane):
    server = served("llama")
    proxy = RecordingProxy(("127.0.0.1", server.port))
    data_proxy = RecordingProxy(("127.0.0.1", server.data_port))
    try:
        options = {**LANES[lane], "data_address": f"127.0.0.1:{data_proxy.port}"}
        private, travelled, kv_first, model = run_client(f"symbiosis://127.0.0.1:{proxy.port}", options=options)
        assert model.base_model.model.symbiosis.transport.lane_kind == lane
    finally:
        proxy.close()
        data_proxy.close()
    streams = proxy.sent()
    messages = [m for stream in streams for m in grpc_messages(stream)]
    data = data_proxy.sent()
    haystack = b"".join(streams) + b"".join(messages) + b"".join(data) + b"".join(shm_recorder)
    assert lane != "shm" or shm_recorder, "no shared-memory traffic was recorded"
    assert lane != "tcp" or sum(map(len, data)) > 100_000, "no data channel traffic was recorded"
    # positive controls: what does travel is found, so the search has the power to find a leak
    assert sorted(found(travelled, haystack)) == sorted(travelled)
    assert len(found(kv_first, haystack)) == len(kv_first), "position-0 values travel as o_proj inputs (documented)"
    leaked = found(private, haystack)
    assert leaked == [], f"private tensors found on the wire: {leaked[:10]}"


def test_token_ids_travel_only_with_executor_side_embeddings(served):
    server = served("llama")
    proxy = RecordingProxy(("127.0.0.1", server.port))
    try:
        private, _, _, _ = run_client(f"symbiosis://127.0.0.1:{proxy.port}", options=LANES["grpc"], embeddings="executor")
    finally:
        proxy.close()
    haystack = b"".join(m for stream in proxy.sent() for m in grpc_messages(stream))
    ids = {name: t for name, t in private.items() if name.endswith("token ids")}
    assert sorted(found(ids, haystack)) == sorted(ids)
    weights = {name: t for name, t in private.items() if " weight " in name or " grad " in name}
    assert found(weights, haystack) == []


class RecordingTransport:
    """Passes every request on to ``inner`` and keeps a copy of what the executor receives."""

    def __init__(self, inner: RemoteTransport) -> None:
        self.inner = inner
        self.seen: list[tuple[str, Direction, torch.Tensor]] = []

    def spec(self):
        return self.inner.spec()

    def tensors(self, names):
        return self.inner.tensors(names)

    def run(self, request: OpRequest) -> torch.Tensor:
        self.seen.append((request.op, request.direction, request.x.detach().clone()))
        return self.inner.run(request)


def test_what_an_executor_can_infer(served):
    """With the default placements, an executor holding the base recovers the training labels from
    the LM head's backward input (argmin per row) and the token ids from the first layer's input
    (nearest neighbour among the normalised embedding rows), as the contract says."""
    transport = RecordingTransport(RemoteTransport(f"127.0.0.1:{served('llama').port}"))
    model = get_peft_model(load_model(transport), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    head_grad = next(x for op, direction, x in transport.seen if op == "lm_head" and direction is Direction.BACKWARD)
    assert torch.equal(head_grad.argmin(-1).reshape(2, 12)[:, :-1], ids[:, 1:])  # the labels: the text shifted by one
    first = next(x for op, direction, x in transport.seen if ".layers.0." in op and direction is Direction.FORWARD)
    names = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    table, gain = transport.tensors(names).values()
    eps = transport.spec().config["rms_norm_eps"]
    normalised = table * torch.rsqrt(table.pow(2).mean(-1, keepdim=True) + eps) * gain
    assert torch.equal(torch.cdist(first, normalised).argmin(-1), ids.reshape(-1))
