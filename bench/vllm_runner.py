"""vLLM (CPU build) decoding K LoRA adapters at once; run by bench.multi_adapter_decode with the vLLM venv's Python.

Imports only vLLM and the standard library (the venv's transformers differs from the project's).
One offline ``LLM`` with ``enable_lora``, configured once for the largest K (as a server for up to
that many adapters would be); for each K in ``--k``: K token-id prompts, prompt i with adapter i,
generated together, greedy, EOS ignored. Time per output token = (time for ``new_tokens`` - time
for 1 token) / (new_tokens - 1), medians over ``--repeats``. Prints nothing but vLLM's log; writes
a JSON list (one entry per K) to ``--out``.

    python bench/vllm_runner.py --model-dir D --adapters A1 ... A64 --k 1 4 16 64 --new-tokens 16 --out result.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter folders; K uses the first K")
    p.add_argument("--k", type=int, nargs="+", help="numbers of adapters to decode with at once (default: all of them)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--memory-fraction", type=float, default=0.1, help="share of host memory vLLM may reserve (weights + KV cache)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ks = args.k or [len(args.adapters)]
    if max(ks) > len(args.adapters) or min(ks) < 1:
        p.error(f"--k must lie in [1, {len(args.adapters)}] (the number of --adapters)")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    most = max(ks)
    llm = LLM(model=args.model_dir, skip_tokenizer_init=True, enable_lora=True, max_loras=most, max_cpu_loras=most, max_lora_rank=8,
              max_model_len=max(256, args.prompt_len + args.new_tokens + 8), dtype=args.dtype, enforce_eager=True,
              gpu_memory_utilization=args.memory_fraction, max_num_seqs=max(most, 8))
    vocab = json.load(open(f"{args.model_dir}/config.json"))["vocab_size"]
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(args.prompt_len)]) for _ in range(most)]
    loras = [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(args.adapters[:most])]

    def timed(k: int, tokens: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts[:k], params, lora_request=loras[:k], use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)

    timed(most, 2)  # warm-up: loads every adapter
    results = []
    for k in ks:
        full, first = [], []
        for _ in range(args.repeats):
            seconds, generated = timed(k, args.new_tokens)
            full.append(seconds)
            first.append(timed(k, 1)[0])
        wall = statistics.median(full)
        results.append({"k": k, "max_loras": most, "new_tokens": args.new_tokens, "generated_tokens": generated, "wall_s": wall,
                        "wall_s_samples": full, "first_token_s": statistics.median(first), "aggregate_tokens_per_s": generated / wall,
                        "tpot_ms": 1e3 * (wall - statistics.median(first)) / (args.new_tokens - 1)})
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
