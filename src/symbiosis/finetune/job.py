"""A fine-tuning job: one PEFT client of a shared executor, trained by a loop with exact resumption.

Why a loop of our own rather than ``transformers.Trainer``: resumption must neither lose nor repeat a
step, even after ``kill -9``. Here the data order is a pure function of the step (``BatchPlan``),
the checkpoint holds every piece of mutable state (adapter, optimizer, scheduler, RNG, position) and
is written atomically, so a resumed job computes bit for bit what the uninterrupted job computes;
the tests check exactly that. Trainer's resumption re-iterates its dataloader to skip batches and
writes checkpoints in place, which gives no such guarantee.

Output directory layout: the final adapter (standard PEFT files) at the top, ``checkpoints/``,
``log.jsonl`` (one record per step and per evaluation) and ``job.json`` (the settings fingerprint
a resumed job must match).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase, get_scheduler

from ..errors import SymbiosisError
from ..executor_ref import ExecutorRef
from .batches import BatchPlan, collate, loss_tokens
from .checkpoint import TrainerState, list_checkpoints, load_checkpoint, remove_partial_checkpoints, save_checkpoint
from .config import FineTuneConfig
from .data import Example, load_examples
from .progress import ProgressBar, TrainingLog

#: Longest sequence a job accepts when neither the user nor the model's context says less.
DEFAULT_MAX_LENGTH = 1024
#: Offset between the eval-split seed and the data-order seed, so the two permutations differ.
_SPLIT_SEED_OFFSET = 1_000_003


class ResumeError(SymbiosisError):
    """The output directory cannot be (re)used as asked: existing checkpoints, or different settings."""


@dataclass(frozen=True)
class FineTuneResult:
    """Where the final adapter is, how many steps ran in total, and the final eval loss (if any)."""

    adapter_dir: Path
    steps: int
    eval_loss: float | None


class FineTuneJob:
    """Train ``config.peft`` on ``config.data`` as a client of ``executor`` (at training priority)."""

    def __init__(self, config: FineTuneConfig, executor: ExecutorRef, tokenizer: PreTrainedTokenizerBase) -> None:
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.output = config.output
        self.log = TrainingLog(self.output / "log.jsonl")
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    # ----------------------------------------------------------------------------------- data
    def load_data(self, max_length: int) -> tuple[list[Example], list[Example]]:
        """(train, eval) examples; raises ``DataError`` naming every bad line before anything trains."""
        cfg = self.config
        options = dict(max_length=max_length, loss_on=cfg.loss_on, truncate=cfg.truncate)
        train = load_examples(cfg.data, self.tokenizer, **options)
        if cfg.eval_data:
            return train, load_examples(cfg.eval_data, self.tokenizer, **options)
        n_eval = max(1, round(len(train) * cfg.eval_fraction)) if cfg.eval_fraction > 0 and len(train) >= 2 else 0
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + _SPLIT_SEED_OFFSET)).tolist()
        held_out = set(order[:n_eval])
        return [e for i, e in enumerate(train) if i not in held_out], [train[i] for i in sorted(held_out)]

    def total_steps(self, num_train: int) -> tuple[int, int]:
        """(optimizer steps, micro-batches) the job runs in total."""
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps, cfg.max_steps * cfg.grad_accum
        micro = math.ceil(cfg.epochs * math.ceil(num_train / cfg.batch_size))
        return math.ceil(micro / cfg.grad_accum), micro

    # ------------------------------------------------------------------------------------ run
    def run(self, *, resume: bool = False, progress: bool = True) -> FineTuneResult:
        """Train to the end (continuing from the newest checkpoint with ``resume``); save the adapter."""
        cfg = self.config
        model = self._build_model()
        max_length = self._max_length(model)
        train, evaluation = self.load_data(max_length)
        checkpoints = self.output / "checkpoints"
        self._claim_output(resume, max_length)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        total, total_micro = self.total_steps(len(train))
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
        plan = BatchPlan(len(train), cfg.batch_size, cfg.seed)

        step, latest = 0, (list_checkpoints(checkpoints) if resume else [])
        if latest:
            state = load_checkpoint(latest[-1], model)
            if state.micro_batch != min(state.step * cfg.grad_accum, total_micro):
                raise ResumeError(f"{latest[-1]}: its data position (micro-batch {state.micro_batch}) does not match step {state.step}")
            state.restore(optimizer, scheduler)
            step = state.step
        self.log.rewind(step)
        bar = ProgressBar(total, step, enabled=progress)
        if latest:
            bar.write(f"resumed from {latest[-1]} (step {step} of {total})")
        eval_loss = None
        eval_every = cfg.eval_every or cfg.save_every
        model.train()
        try:
            while step < total:
                step += 1
                first, last = (step - 1) * cfg.grad_accum, min(step * cfg.grad_accum, total_micro)
                started = time.perf_counter()
                loss, tokens = self._train_step(model, [collate([train[i] for i in plan.micro_batch(m)], self.pad_id) for m in range(first, last)], params)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                rate = bar.step(loss=loss, tokens=tokens, lr=lr)
                epoch, _ = plan.position(last - 1)
                self.log.write(
                    dict(step=step, epoch=epoch, loss=loss, lr=lr, tokens=tokens, step_s=time.perf_counter() - started, tokens_per_s=rate, time=time.time())
                )
                if evaluation and (step % eval_every == 0 or step == total):
                    eval_loss = self.evaluate(model, evaluation)
                    bar.eval_loss(eval_loss)
                    self.log.write(dict(step=step, eval_loss=eval_loss, eval_examples=len(evaluation), time=time.time()))
                if step % cfg.save_every == 0 and step < total:
                    save_checkpoint(checkpoints, model, TrainerState.capture(step, last, optimizer, scheduler), keep=cfg.keep_checkpoints)
        finally:
            bar.close()
        self._save_adapter(model)
        return FineTuneResult(self.output, step, eval_loss)

    def _train_step(self, model: PeftModel, batches: list[dict[str, torch.Tensor]], params: list[torch.nn.Parameter]) -> tuple[float, int]:
        """Forward and backward over one step's micro-batches; returns (token-mean loss, input tokens)."""
        n_items = sum(loss_tokens(b) for b in batches)
        device = params[0].device
        loss, tokens = 0.0, 0
        for batch in batches:
            out = model(**{k: v.to(device) for k, v in batch.items()}, num_items_in_batch=n_items)
            out.loss.backward()
            loss += out.loss.item()
            tokens += int(batch["attention_mask"].sum())
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        return loss, tokens

    @torch.no_grad()
    def evaluate(self, model: PeftModel, examples: list[Example]) -> float:
        """Token-mean loss of ``model`` on ``examples`` (the model is left in training mode)."""
        model.eval()
        try:
            size = self.config.eval_batch_size
            batches = [collate(examples[i : i + size], self.pad_id) for i in range(0, len(examples), size)]
            n_items = sum(loss_tokens(b) for b in batches)
            device = next(p.device for p in model.parameters() if p.requires_grad)
            return sum(model(**{k: v.to(device) for k, v in b.items()}, num_items_in_batch=n_items).loss.item() for b in batches)
        finally:
            model.train()

    # ---------------------------------------------------------------------------- internals
    def _claim_output(self, resume: bool, max_length: int) -> None:
        """Create the output directory, or check that resuming it is safe; record the fingerprint."""
        job_file = self.output / "job.json"
        fingerprint = {**self.config.fingerprint(), "max_length": max_length}
        if job_file.is_file():
            if not resume:
                raise ResumeError(f"{self.output} already holds a fine-tuning job; pass --resume to continue it, or choose another output directory")
            previous = json.loads(job_file.read_text(encoding="utf-8"))
            changed = sorted(k for k in fingerprint.keys() | previous.keys() if fingerprint.get(k) != previous.get(k))
            if changed:
                raise ResumeError(f"cannot resume {self.output}: settings differ from the interrupted job ({', '.join(changed)})")
        self.output.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(self.output / "checkpoints")
        tmp = job_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(fingerprint, indent=2), encoding="utf-8")
        os.replace(tmp, job_file)

    def _build_model(self) -> PeftModel:
        cfg = self.config
        client = self.executor.load_client(priority="training", device=cfg.device, dtype=cfg.dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = get_peft_model(client, copy.deepcopy(cfg.peft))
        torch.manual_seed(cfg.seed)  # dropout and other training randomness
        return model

    def _max_length(self, model: PeftModel) -> int:
        """``config.max_length``, or the model's context (less virtual tokens) up to ``DEFAULT_MAX_LENGTH``."""
        virtual = self.config.peft.num_virtual_tokens if self.config.peft.is_prompt_learning else 0
        positions = getattr(model.config, "max_position_embeddings", None)
        if self.config.max_length is None:
            return min(DEFAULT_MAX_LENGTH, positions - virtual) if positions else DEFAULT_MAX_LENGTH
        if positions is not None and self.config.max_length + virtual > positions:
            raise ValueError(f"max_length {self.config.max_length} + {virtual} virtual tokens exceeds the model's {positions} positions")
        return self.config.max_length

    def _save_adapter(self, model: PeftModel) -> None:
        """The final adapter in PEFT format at the top of the output directory, each file replaced atomically."""
        tmp = self.output / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for file in tmp.iterdir():
            os.replace(file, self.output / file.name)
        tmp.rmdir()
