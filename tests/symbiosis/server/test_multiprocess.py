"""Processes: batching across client processes, surviving a server restart mid-training, drain."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time

import torch
from peft import LoraConfig, get_peft_model

from symbiosis import BaseExecutor, load_model
from symbiosis.transport import RemoteTransport
from symbiosis.workload import AffineTask, train

from ..equivalence import assert_close
from .servers import free_port, server_process, start_server_process
from .workers import forward_client

CLIENTS, ROUNDS = 3, 6


def test_requests_from_processes_share_gemms(model_dir):
    """Three client processes run forward passes at once; the server's GEMMs hold several clients."""
    with server_process(model_dir("llama"), "--max-wait-ms", "20") as server:
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(CLIENTS), ctx.Queue()
        procs = [ctx.Process(target=forward_client, args=(server.address, f"p{i}", barrier, ROUNDS, results)) for i in range(CLIENTS)]
        for proc in procs:
            proc.start()
        reports = [results.get(timeout=180) for _ in procs]
        for proc in procs:
            proc.join(60)
        stats = load_model(server.address).symbiosis.transport.stats()
    assert all(failed == 0 for _, _, failed in reports)
    # no lost or duplicated requests: the server answered exactly what each client counted
    assert {cid: done for cid, done, _ in reports} == {cid: n for cid, n in stats["completed_by_client"].items() if cid.startswith("p")}
    total = stats["total"]
    assert total["requests_per_gemm"] > 1.0 and total["shared_gemm_fraction"] > 0.0, total
    assert max(op["clients_per_gemm"] for op in stats["ops"]) > 1.0


def _lora_run(executor_or_url, *, prepare=None):
    """Six LoRA fine-tuning steps; ``prepare(model)`` runs before training (e.g. to add hooks)."""
    torch.manual_seed(0)
    client = load_model(executor_or_url, connect_options={"retry_timeout_s": 120} if isinstance(executor_or_url, str) else None)
    model = get_peft_model(client, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    if prepare is not None:
        prepare(model)
    task = AffineTask(256, a=1, b=3)
    result = train(model, task, steps=6, batch_size=2, seq_len=8, lr=1e-2)
    return model, result


def test_training_survives_a_server_restart(model_dir, hold_batches):
    """SIGKILL the server while a request of step 2's backward pass is in flight and start it again
    on the same port: the adapter ends exactly as in an uninterrupted run (no optimizer step lost or
    repeated), after retries."""
    path = model_dir("llama")
    reference, ref_result = _lora_run(BaseExecutor.from_pretrained(path))
    port = free_port()
    # every request waits 100 ms in the server's queue (for a batch to fill): a window to kill it in
    server = start_server_process(path, "--max-wait-ms", "100", "--active-window-ms", "3600000", port=port)
    hold_batches(RemoteTransport(f"127.0.0.1:{port}", shared_memory=False))
    killed_in_flight: list[bool] = []
    restarted: list = []

    def kill_during_a_request() -> None:
        probe = RemoteTransport(f"127.0.0.1:{port}", shared_memory=False)
        while probe.stats()["queue_depth"] == 0:  # until the client's next backward request is queued
            pass
        server.kill()
        killed_in_flight.append(True)
        time.sleep(0.5)
        restarted.append(start_server_process(path, port=port))

    def prepare(model) -> None:
        backward_passes = itertools.count()

        def hook(_module, _grad_output) -> None:
            if next(backward_passes) == 2:  # step 2, during its backward pass
                threading.Thread(target=kill_during_a_request, daemon=True).start()

        model.base_model.model.model.layers[0].mlp.down_proj.register_full_backward_pre_hook(hook)

    try:
        model, result = _lora_run(server.address, prepare=prepare)
        transport = model.base_model.model.symbiosis.transport
        assert killed_in_flight and restarted and transport.retries > 0, "the restart did not interrupt the loop"
    finally:
        server.kill()
        for again in restarted:
            again.kill()
    assert len(result.losses) == 6
    assert_close(torch.tensor(result.losses), torch.tensor(ref_result.losses), "losses")
    ref = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert_close(param, ref[name], name)
