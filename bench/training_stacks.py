"""Experiment 8 — the training stacks users run: what each costs on a client and on the monolithic model.

One LoRA adapter (r=8 on every linear layer, same seed) fine-tuned with AdamW on batches of
``--batch`` x ``--seq-len`` tokens, on the monolithic model (transformers + PEFT) and on a split
client of an in-process executor, under each stack:

* ``eager``: float32, a plain loop;
* ``autocast``: the same loop under ``torch.autocast`` in bfloat16 (the executor computes in it);
* ``compile``: ``model.forward = torch.compile(model.forward)`` (requests to the executor are graph
  breaks); the first step, which compiles, is reported on its own;
* ``trl-sft``: TRL's ``SFTTrainer`` with its defaults for a CPU user (bfloat16 autocast, gradient
  checkpointing, the fused chunked LM head), steps timed by a callback.

Reported: the median step time after a warm-up step, and split / monolithic per stack. Systems run
one after another in this process (``--threads`` torch threads).
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench import common
from bench.workers import adapted

STACKS = ("eager", "autocast", "compile", "trl-sft")
SYSTEMS = ("monolithic", "split in-process")


def base_model(system: str, path: Path):
    from transformers import AutoModelForCausalLM

    from symbiosis import BaseExecutor, load_model

    if system == "monolithic":
        return AutoModelForCausalLM.from_pretrained(path)
    return load_model(BaseExecutor.from_pretrained(path))


def loop_steps(model, batch: torch.Tensor, steps: int, stack: str) -> tuple[list[float], float | None]:
    """Step times of a plain AdamW loop (the first, warm-up step apart); the compile step's time."""
    model.train()
    if stack == "compile":
        model.forward = torch.compile(model.forward)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if stack == "autocast" else nullcontext
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with context():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:], times[0] if stack == "compile" else None


def trl_steps(model, batch: torch.Tensor, steps: int, out: Path) -> list[float]:
    """Step times of TRL's SFTTrainer (defaults; LoRA through ``peft_config``), the first one apart."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from symbiosis.tiny import train_tiny_tokenizer

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter() - self.start)

    data = Dataset.from_list([{"input_ids": row.tolist()} for row in batch.repeat(steps + 1, 1)])
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch.shape[0], max_steps=steps + 1, report_to=[],
                     save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, max_length=batch.shape[1])
    clock = Clock()
    torch.manual_seed(0)
    # the data is tokenized already; the tokenizer only pads (its ids lie within any benchmark vocabulary)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, callbacks=[clock], processing_class=train_tiny_tokenizer(),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
    trainer.train()
    return clock.times[1:]


def main(argv: list[str] | None = None) -> int:
    p = common.parser("training_stacks", __doc__)
    p.add_argument("--steps", type=int, default=3, help="measured steps per system and stack (after one warm-up step)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.seq_len = 1, 2, 16
    torch.set_num_threads(args.threads)
    path = common.model_dir(args)
    start = common.start(args)
    batch = torch.randint(3, 500, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows, samples = [], {}
    for stack in args.stacks:
        medians = {}
        for system in SYSTEMS:
            base = base_model(system, path)
            compile_s = None
            if stack == "trl-sft":
                times = trl_steps(base, batch, args.steps, args.out / "trl")
            else:
                times, compile_s = loop_steps(adapted(base, "lora", seed=0), batch, args.steps, stack)
            samples[f"{stack}/{system}"] = times
            medians[system] = statistics.median(times)
            rows.append({"stack": stack, "system": system, "step_s": medians[system], "first_step_s": compile_s})
        rows[-1]["vs_monolithic"] = medians["split in-process"] / medians["monolithic"]
    result = {
        "model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": start,
        "config": {"batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "threads": args.threads,
                   "peft": "LoRA r=8, all linear layers", "optimizer": "AdamW"},
        "rows": rows, "samples_s": samples,
        "targets": {},  # issue 12 sets no speed target: every stack must work and equal the monolithic model (tests)
    }
    md = common.table(
        ["stack", "system", f"step ({args.batch}x{args.seq_len}) s", "first (compiling) step s", "split vs monolithic"],
        [[r["stack"], r["system"], r["step_s"], r["first_step_s"], f"{r['vs_monolithic']:.3f}x" if "vs_monolithic" in r else None] for r in rows],
    )

    def draw(out: Path) -> Path:
        series = {system: ([r["stack"] for r in rows if r["system"] == system], [r["step_s"] for r in rows if r["system"] == system])
                  for system in SYSTEMS}
        return common.chart(out / "training_stacks.png", "LoRA training step per stack", "", "seconds per step", series, kind="bar")

    common.write(args, "training_stacks", result, md, [draw])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
