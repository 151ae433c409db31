"""Experiment 7 — the base held in float32, bfloat16, int8 and NF4: resident bytes and the cost of a product.

For each way of holding the base: the executor's resident bytes (``parameter_bytes``: every frozen
tensor and quantization state once) next to the monolithic model a user loads the same way
(transformers, and for int8 / NF4 the QLoRA recipe: ``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training``,
counted the same way), split into the linear ops and the rest; then the median time of the forward
(``x·Wᵀ``) and backward (``grad_y·W``) product of the largest fused op at ``--rows`` rows, in the
executor's path (dequantise + GEMM for quantized ops), against the same product on a dense float32
weight (``torch.mm``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench import common

GIB = 2**30
KINDS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "int8": ("float32", "int8"), "nf4": ("bfloat16", "nf4")}


def held_bytes(tensors) -> int:
    """Bytes of the storages of ``tensors``, each storage once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def monolithic_bytes(path: Path, dtype: str, quantization: str | None) -> int:
    """Parameters, buffers and quantization states of the model a user loads (QLoRA-prepared when quantized)."""
    from transformers import AutoModelForCausalLM

    from symbiosis.executor.quantized import QuantizedWeight, is_quantized_linear, load_options

    torch_dtype = getattr(torch, dtype)
    extra = load_options(path, quantization, torch_dtype) if quantization else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    states = [t for m in model.modules() if is_quantized_linear(m) for t in QuantizedWeight.of(m).tensors()]
    return held_bytes([*model.parameters(), *model.buffers(), *states])


def time_products(executor, rows: int, repeats: int) -> dict:
    """Median seconds of the largest fused op's forward and backward products through the executor's op."""
    from symbiosis.protocol import Direction

    op = max((op for op in executor._ops.values() if op.info.members), key=lambda op: op.info.in_features * op.info.out_features)
    result = {"op": op.info.name, "shape": [op.info.out_features, op.info.in_features], "rows": rows}
    for direction in Direction:
        width = op.info.in_features if direction is Direction.FORWARD else op.info.out_features
        x = torch.randn(rows, width, dtype=executor.dtype)
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            op.apply(direction, x)
            times.append(time.perf_counter() - begin)
        result[direction.name.lower() + "_ms"] = statistics.median(times) * 1e3
    return result


def main(argv: list[str] | None = None) -> int:
    from symbiosis import BaseExecutor
    from symbiosis.executor.quantized import QuantizedOp

    p = common.parser("quantized_base", __doc__)
    p.add_argument("--rows", type=int, default=256, help="rows of the timed products (default 256: a 4 x 64-token batch)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.repeats = 8, 2
    path = common.model_dir(args)
    start = common.start(args)
    torch.set_num_threads(args.threads)
    rows, results = [], {}
    for kind in args.kinds:
        dtype, quantization = KINDS[kind]
        executor = BaseExecutor.from_pretrained(path, dtype=dtype, quantization=quantization, fuse=True)
        linear = [t for op in executor._ops.values() if op.info.kind.value == "linear" and not op.info.members
                  for t in op.held_tensors() if isinstance(op, QuantizedOp) or op.info.name != "lm_head"]
        r = {"executor_bytes": executor.parameter_bytes(), "executor_linear_bytes": held_bytes(linear),
             "monolithic_bytes": monolithic_bytes(path, dtype, quantization), **time_products(executor, args.rows, args.repeats)}
        results[kind] = r
        del executor
    dense = results.get("float32")
    for kind, r in results.items():
        rows.append([kind, r["executor_bytes"] / GIB, r["executor_linear_bytes"] / GIB, r["monolithic_bytes"] / GIB,
                     r["forward_ms"], r["backward_ms"],
                     dense and r["forward_ms"] / dense["forward_ms"], dense and r["backward_ms"] / dense["backward_ms"]])
    first = next(iter(results.values()))
    md = (f"Base: {common.parameter_count(path) / 1e6:.0f}M parameters; products of `{first['op']}` "
          f"({first['shape'][0]} x {first['shape'][1]}) on {args.rows} rows, {args.threads} thread(s).\n\n")
    md += common.table(["base held as", "executor GiB", "of which linear ops (no LM head)", "monolithic model GiB",
                        "forward ms", "backward ms", "forward vs float32", "backward vs float32"], rows)
    result = {"model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": start, "rows": args.rows,
              "threads": args.threads, "results": results}
    common.write(args, "quantized_base", result, md, [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
