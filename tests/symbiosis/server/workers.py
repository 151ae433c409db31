"""Client processes for the multi-process tests (started with the ``spawn`` method)."""

from __future__ import annotations

import threading

import torch

from symbiosis import load_model
from symbiosis.transport import MeteredTransport, connect


def forward_client(url: str, client_id: str, barrier, rounds: int, results) -> None:
    """Wait for the others, run ``rounds`` forward passes, report how many requests were answered."""
    transport = MeteredTransport(connect(url))
    model = load_model(transport, client_id=client_id)
    ids = torch.arange(3, 11).reshape(1, 8)
    barrier.wait()
    with torch.no_grad():
        for _ in range(rounds):
            model(input_ids=ids)
    results.put((client_id, transport.completed, transport.failed))


def stuck_client(url: str, options: dict) -> None:
    """Send one request and block in it (the test kills this process meanwhile); ``options`` choose its lane."""
    model = load_model(url, connect_options=options)
    model(input_ids=torch.tensor([[1, 2, 3]]))


def idle_client(url: str, ready) -> None:
    """Open a gRPC session with one request, report ready, then hold the session idle (the test
    stops or kills this process)."""
    model = load_model(url, connect_options={"shared_memory": False, "data_channel": False})
    model(input_ids=torch.tensor([[1, 2, 3]]))
    ready.set()
    threading.Event().wait()


def gpu_client(url: str, path: str, device: str, results) -> None:
    """A client process computing on ``device``: op calls through a shared-memory channel compared with
    an in-process executor on the same device, then the equivalence suite through the server; reports
    whether the channel's CUDA buffers were used, the worst op error and the suite's gradient error."""
    try:
        from pathlib import Path

        from peft import LoraConfig

        from symbiosis import BaseExecutor
        from symbiosis.protocol import Direction, OpRequest
        from symbiosis.transport import RemoteTransport

        from ..equivalence import check_equivalence

        transport = RemoteTransport(url.removeprefix("symbiosis://"), shared_memory=True)
        local = BaseExecutor.from_pretrained(Path(path), device=device)
        worst = 0.0
        for op, direction, width in [("model.layers.0.mlp.down_proj", Direction.FORWARD, 128), ("lm_head", Direction.BACKWARD, 256)]:
            x = torch.randn(5, width, device=device)
            y = transport.run(OpRequest(op, direction, x))
            assert y.device == x.device
            reference = local.run(OpRequest(op, direction, x))
            worst = max(worst, ((y - reference).abs().max() / reference.abs().max()).item())
        lane = transport._local.shm
        lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
        errors = check_equivalence(Path(path), lora, executor=url, device=device, reference_device=device,
                                   connect_options={"shared_memory": True}, rel_tol=1e-4)
        results.put({"cuda_buffers": lane is not None and lane.cuda is not None, "max_error": worst, "grads": errors["grads"]})
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        import traceback

        results.put({"error": "".join(traceback.format_exception(exc))[-3000:]})
