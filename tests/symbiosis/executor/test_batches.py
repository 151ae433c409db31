"""A batch of several requests is one product whose rows reach each request's own destination."""

from __future__ import annotations

import threading

import pytest
import torch

from symbiosis import BaseExecutor
from symbiosis.protocol import Direction, OpRequest

OP = "model.layers.0.self_attn.(q_proj+k_proj+v_proj)"
ROWS = (1, 2, 3)


@pytest.mark.parametrize("pack_weights", [False, True])
@pytest.mark.parametrize("with_destinations", ["all", "some"])
def test_each_request_of_a_batch_gets_its_own_rows(model_dir, hold_batches, pack_weights, with_destinations):
    executor = hold_batches(BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=60.0, max_rows=sum(ROWS), pack_weights=pack_weights))
    info = executor.spec().ops[OP]
    weight = executor.tensors([f"model.layers.0.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj")])
    weight = torch.cat(list(weight.values()))
    out_dtypes = (torch.float32, torch.bfloat16, torch.float32)
    requests = [OpRequest(OP, Direction.FORWARD, torch.randn(rows, info.in_features), client_id=f"c{i}", out_dtype=dtype)
                for i, (rows, dtype) in enumerate(zip(ROWS, out_dtypes, strict=True))]
    outs = [torch.full((r.rows, info.out_features), float("nan"), dtype=r.out_dtype) for r in requests]
    if with_destinations == "some":
        outs[1] = None
    results: dict[int, tuple] = {}

    def send(i: int) -> None:  # the thread whose submit finds the batch full computes it, callbacks included
        executor.submit(requests[i], lambda y, error: results.__setitem__(i, (y, error)), out=outs[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert executor.stats.total()["gemms"] == 1  # one product served all three
    for i, request in enumerate(requests):
        y, error = results[i]
        assert error is None
        assert outs[i] is None or y is outs[i]
        assert y.dtype == request.out_dtype and y.shape == (request.rows, info.out_features)
        expected = (request.x @ weight.t()).to(request.out_dtype)
        torch.testing.assert_close(y, expected, rtol=1e-2 if y.dtype is torch.bfloat16 else 1e-5, atol=1e-2 if y.dtype is torch.bfloat16 else 1e-5)
