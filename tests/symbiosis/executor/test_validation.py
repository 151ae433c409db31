"""Bad requests fail in the requesting client alone; the executor keeps serving everyone else."""

from __future__ import annotations

import threading

import pytest
import torch

from symbiosis import BadRequestError, BaseExecutor, load_model
from symbiosis.protocol import PRIORITY_INFERENCE, Direction, OpRequest
from symbiosis.tiny import tiny_config

OP = "model.layers.0.self_attn.o_proj"


@pytest.fixture(scope="module")
def executor():
    return BaseExecutor.from_config(tiny_config("llama"), seed=0)


def request(x, op=OP, direction=Direction.FORWARD, **kwargs) -> OpRequest:
    return OpRequest(op, direction, x, client_id="bad", **kwargs)


@pytest.mark.parametrize(
    "bad, message",
    [
        (request(torch.randn(3, 64), op="model.layers.9.nope"), "unknown op"),
        (request(torch.randn(3, 63)), "expected rows of width 64"),
        (request(torch.randn(3, 64, 1)), "expected rows of width 64"),
        (request(torch.randn(64)), "expected rows of width 64"),
        (request(torch.randn(3, 64).to(torch.float64)), "dtype torch.float64"),
        (request(torch.ones(3, 64, dtype=torch.int64)), "dtype torch.int64"),
        (request(torch.full((3, 64), float("nan"))), "NaN or Inf"),
        (request(torch.tensor([[float("inf")] * 64])), "NaN or Inf"),
        (request(torch.randn(3, 64), direction=Direction.BACKWARD, op="lm_head"), "expected rows of width 256"),
        (request(torch.tensor([1, 300]), op="model.embed_tokens"), "token ids must lie in"),
        (request(torch.tensor([-1]), op="model.embed_tokens"), "token ids must lie in"),
        (request(torch.tensor([[1, 2]]), op="model.embed_tokens"), "1-D tensor of token ids"),
        (request(torch.tensor([1]), op="model.embed_tokens", direction=Direction.BACKWARD), "no backward"),
        (request("not a tensor"), "must be a tensor"),
        (request(torch.randn(3, 64), features=(0, 65)), r"features must be \[start, end\) within \[0, 64\)"),
        (request(torch.randn(3, 64), features=(5, 5)), "features must be"),
        (request(torch.randn(3, 64), direction=Direction.BACKWARD, features=(8, 16)), "expected rows of width 8"),
        (request(torch.randn(3, 64), compute_dtype=torch.float64), "compute_dtype torch.float64"),
        (request(torch.randn(3, 64), weight_dtype=torch.int8), "weight_dtype torch.int8"),
        (request(torch.tensor([1]), op="model.embed_tokens", compute_dtype=torch.bfloat16), "takes no compute_dtype"),
    ],
)
def test_bad_request_raises_clear_error(executor, bad, message):
    with pytest.raises(BadRequestError, match=message):
        executor.run(bad)


def test_request_row_limit():
    executor = BaseExecutor.from_config(tiny_config("llama"), max_request_rows=4)
    executor.run(request(torch.randn(4, 64)))
    with pytest.raises(BadRequestError, match="5 rows exceed the limit of 4"):
        executor.run(request(torch.randn(5, 64)))


def test_frozen_tensors_handed_out_are_the_callers_own():
    """An in-process caller that modifies what ``tensors()`` gave it changes nothing in the executor."""
    executor = BaseExecutor.from_config(tiny_config("llama"), seed=0)
    names = ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"]
    x = torch.randn(2, 64)
    before = executor.tensors(names), executor.run(request(x, op="lm_head"))
    for tensor in executor.tensors(names).values():
        tensor.mul_(3.0)
    after = executor.tensors(names), executor.run(request(x, op="lm_head"))
    assert all(torch.equal(after[0][name], before[0][name]) for name in names)
    assert torch.equal(after[1], before[1])


def test_finite_inputs_whose_sum_overflows_are_served(executor):
    """The batch check sums in float32; a sum that overflows on finite values must not refuse them."""
    x = torch.zeros(4, 64)
    x[:, 0] = 3e38  # finite, but 4 x 3e38 is beyond float32's range
    assert not torch.isfinite(x.sum())
    out = executor.run(request(x))
    weight = executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    assert torch.equal(out, x @ weight.t())


def test_non_finite_inputs_can_be_allowed():
    executor = BaseExecutor.from_config(tiny_config("llama"), reject_non_finite=False)
    out = executor.run(request(torch.full((2, 64), float("nan"))))
    assert out.isnan().all()


def test_bad_clients_do_not_disturb_good_ones(executor, hold_batches):
    """Good clients generating while a bad client floods the executor get exactly their solo results,
    also when their requests share a batch with the flood's (the executor waits a little for batches)."""
    prompt = torch.tensor([[5, 6, 7, 8]])
    expected = [load_model(executor).generate(input_ids=prompt, max_new_tokens=10, do_sample=False)] * 3
    batching = hold_batches(BaseExecutor.from_config(tiny_config("llama"), seed=0, max_wait_s=0.005))
    good = [load_model(batching, client_id=f"good{i}") for i in range(3)]
    errors, results, stop = [], {}, threading.Event()

    def flood() -> None:
        bad_inputs = [torch.randn(2, 63), torch.full((2, 64), float("nan")), torch.randn(2, 64).double()]
        while not stop.is_set():
            for x in bad_inputs:
                try:  # at inference priority: in the generating clients' lane, so that they share batches
                    batching.run(request(x, priority=PRIORITY_INFERENCE))
                except BadRequestError as exc:
                    errors.append(exc)

    def generate(index: int) -> None:
        results[index] = good[index].generate(input_ids=prompt, max_new_tokens=10, do_sample=False)

    flooder = threading.Thread(target=flood)
    flooder.start()
    workers = [threading.Thread(target=generate, args=(i,)) for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    flooder.join()
    assert errors, "the flood never reached the executor"
    # one flooding thread never batches with itself: every split batch held a good client's request
    assert batching.stats.per_op()[OP, Direction.FORWARD].split_batches > 0, "no bad request ever shared a batch"
    for index in range(3):
        assert torch.equal(results[index], expected[index])


def test_client_sees_bad_input_error_from_its_own_forward(executor):
    model = load_model(executor)
    hidden = torch.full((1, 2, 64), float("nan"))
    with pytest.raises(BadRequestError, match="NaN or Inf"):
        model.model.layers[0].self_attn.o_proj(hidden)
    # the same client keeps working afterwards
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_non_finite_gradients_reach_the_client(executor):
    """Loss scaling (fp16 AMP) needs overflowing gradients to come back, not an error."""
    grad = torch.full((2, 64), float("inf"))
    out = executor.run(request(grad, direction=Direction.BACKWARD))
    assert not out.isfinite().any()


def test_non_finite_request_in_a_batch_fails_alone(executor, hold_batches):
    """Batched with good requests, a NaN request fails and the others get exact results."""
    good_x = torch.randn(3, 64)
    expected = executor.run(request(good_x))
    # the executor waits until all 8 requests (24 rows) are there, so they form one batch
    batching = hold_batches(BaseExecutor.from_config(tiny_config("llama"), seed=0, max_wait_s=60.0, max_rows=24))
    results, barrier = {}, threading.Barrier(8)

    def run(index: int) -> None:
        x = torch.full((3, 64), float("nan")) if index % 2 else good_x
        barrier.wait()
        try:
            results[index] = batching.run(OpRequest(OP, Direction.FORWARD, x, client_id=f"c{index}"))
        except BadRequestError as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, result in results.items():
        if index % 2:
            assert isinstance(result, BadRequestError) and f"c{index}" in str(result)
        else:
            assert torch.allclose(result, expected, rtol=1e-5, atol=1e-6)
    # one batch of all eight failed; the four good requests then ran one GEMM each
    stats = batching.stats.total()
    assert (stats["split_batches"], stats["gemms"], stats["requests"]) == (1, 4, 4)


def test_products_with_a_compute_dtype_or_features_equal_the_reference(executor):
    """A request may ask for the product in another dtype (the weight is cast to it) and with a slice of
    the weight's rows; requests that differ in either never share a GEMM."""
    weight = executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    x = torch.randn(3, 64)
    y = executor.run(request(x, compute_dtype=torch.bfloat16))  # returned in the rows' dtype
    assert y.dtype == torch.float32 and torch.equal(y, (x.bfloat16() @ weight.bfloat16().t()).float())
    assert torch.equal(executor.run(request(x, features=(8, 24))), x @ weight[8:24].t())
    grad = torch.randn(3, 16)
    assert torch.equal(executor.run(request(grad, direction=Direction.BACKWARD, features=(8, 24))), grad @ weight[8:24])
    # the weight rounded to bfloat16 first, the product in float32
    assert torch.equal(executor.run(request(x, weight_dtype=torch.bfloat16)), x @ weight.bfloat16().float().t())
    # the executor's own dtype as compute dtype, or a weight dtype that rounds nothing, is the plain request
    for plain in (request(x, compute_dtype=torch.float32), request(x, weight_dtype=torch.float32)):
        assert torch.equal(executor.run(plain), x @ weight.t())
        assert plain.batch_key() == request(x).batch_key()


def test_requests_in_different_compute_dtypes_run_in_separate_gemms(hold_batches):
    executor = hold_batches(BaseExecutor.from_config(tiny_config("llama"), seed=0, max_wait_s=0.2))
    weight = executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    x = torch.randn(2, 64)
    results: dict[str, torch.Tensor] = {}
    kinds = {"float32": {}, "bfloat16": {"compute_dtype": torch.bfloat16}, "float32 again": {}, "slice": {"features": (0, 32)}}
    threads = [
        threading.Thread(target=lambda k=k, o=o: results.__setitem__(k, executor.run(OpRequest(OP, Direction.FORWARD, x, client_id=k, **o))))
        for k, o in kinds.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # (a GEMM's rounding may depend on how many rows it has: compare within float32 precision)
    assert torch.allclose(results["float32"], x @ weight.t(), atol=1e-6) and torch.equal(results["float32 again"], results["float32"])
    assert torch.equal(results["bfloat16"], (x.bfloat16() @ weight.bfloat16().t()).float())
    assert torch.allclose(results["slice"], x @ weight[:32].t(), atol=1e-6)
    stats = executor.stats.total()
    assert stats["requests"] == 4 and stats["gemms"] == 3  # the two float32 requests shared one GEMM
