"""Under ``torch.autocast`` a client computes what the monolithic model computes: every executor op
runs in the autocast dtype, weight included, as ``F.linear`` does under autocast.

The bound is the core suite's (``1e-5 × max|reference|`` per tensor), far below the autocast dtype's
own precision, so only the same computation passes; measured: bit-identical logits, loss and
gradients on CPU in bfloat16 and float16.
"""

from __future__ import annotations

import pytest
import torch

from symbiosis import BaseExecutor, load_model

from ..equivalence import check_equivalence
from ..test_equivalence_architectures import REQUIRED
from ..test_equivalence_peft import METHODS


def lora():
    return METHODS["lora"]()


@pytest.mark.parametrize("model_type", REQUIRED)
def test_architectures_under_bfloat16_autocast(model_dir, model_type):
    check_equivalence(model_dir(model_type), lora(), autocast=torch.bfloat16)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_methods_under_bfloat16_autocast(model_dir, method):
    check_equivalence(model_dir("llama"), METHODS[method](), autocast=torch.bfloat16, generate=False)


def test_float16_autocast(model_dir):
    check_equivalence(model_dir("llama"), lora(), autocast=torch.float16)


class _Recorder:
    """The executor as a transport, keeping each request's compute dtype."""

    def __init__(self, executor: BaseExecutor) -> None:
        self.executor, self.dtypes = executor, []

    def spec(self):
        return self.executor.spec()

    def tensors(self, names):
        return self.executor.tensors(names)

    def run(self, request):
        self.dtypes.append((request.x.dtype, request.compute_dtype))
        return self.executor.run(request)


def test_requests_carry_the_autocast_dtype_only_inside_autocast(model_dir):
    transport = _Recorder(BaseExecutor.from_pretrained(model_dir("llama")))
    client = load_model(transport)
    ids = torch.tensor([[1, 2, 3, 4]])
    client(input_ids=ids)
    assert {compute for _, compute in transport.dtypes} == {None}
    transport.dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        client(input_ids=ids)
    # every linear op, the LM head included, sends bfloat16 rows to be multiplied in bfloat16
    assert set(transport.dtypes) == {(torch.bfloat16, torch.bfloat16)}
