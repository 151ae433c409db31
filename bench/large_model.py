"""Build the large benchmark base once: a random Llama of >= 3B parameters, and its NF4 / int8 copies.

``python -m bench.large_model`` writes, under ``bench/.cache/`` (gitignored):

- ``llama-3b-float16``: random weights, initialised directly in bfloat16 (6 GiB: building in float32
  would need 12 GiB more) and saved in float16, as Llama-2 and Phi-2 are published; loading it in
  bfloat16 converts every weight, so each process that loads it holds its own copy, as on a GPU;
- with ``--quantize nf4`` (or ``int8``), ``llama-3b-float16-nf4``: the same weights quantized once by
  bitsandbytes through transformers and saved pre-quantized, as QLoRA checkpoints are published
  (quantizing 3B weights takes minutes per process on this CPU).

Both sides of ``bench.finetune_capacity --model-dir ...`` then load the same files. Run it under
``/work/coord/bench-run``-style exclusive use: it needs ~8 GiB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import CACHE

#: >= 3B parameters with the usual Llama proportions: 29 layers of width 3072 (MLP 8192, GQA 4:1).
LARGE = dict(hidden_size=3072, num_hidden_layers=29)


def build(path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from symbiosis.tiny import llama_config

    if (path / "config.json").is_file():
        return path
    begin = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(llama_config(**LARGE), dtype=torch.bfloat16)
    model.to(torch.float16)  # one weight at a time
    model.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {path} ({params / 1e9:.2f}B parameters) in {time.time() - begin:.0f} s", flush=True)
    return path


def quantize(source: Path, quantization: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import AutoModelForCausalLM

    from symbiosis.executor.quantized import load_options

    path = source.with_name(f"{source.name}-{quantization}")
    if (path / "config.json").is_file():
        return path
    begin = time.time()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **load_options(source, quantization, dtype))
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    print(f"quantized {path} ({config['quantization_config'].get('bnb_4bit_quant_type', 'int8')}) in {time.time() - begin:.0f} s", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.large_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantize", choices=["nf4", "int8"], action="append", default=[], help="also save a pre-quantized copy (repeatable)")
    args = p.parse_args(argv)
    base = build(CACHE / "llama-3b-float16")
    for quantization in args.quantize:
        quantize(base, quantization)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
