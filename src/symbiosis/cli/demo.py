"""``symbiosis demo``: one base, mixed-PEFT clients fine-tuning and generating at once."""

from __future__ import annotations

import argparse
import itertools
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftConfig, PeftModel, PeftType, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..client import load_model
from ..executor import BaseExecutor
from ..protocol import Direction
from ..tiny import save_random_model, tiny_config
from ..workload import AffineTask, generate, train


def _jobs(steps: int) -> list[tuple[str, str, Callable[[], PeftConfig], float]]:
    """(client name, role, PEFT config factory, learning rate) of the demo's six clients."""
    ia3 = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return [
        ("lora", "fine-tune", lambda: LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"), 1e-2),
        ("ia3", "fine-tune", lambda: IA3Config(task_type="CAUSAL_LM", **ia3), 0.3),
        ("adalora", "fine-tune", lambda: AdaLoraConfig(task_type="CAUSAL_LM", init_r=8, target_r=4, total_step=steps, tinit=steps // 5, tfinal=steps // 5, target_modules=["q_proj", "v_proj", "up_proj"]), 1e-2),
        ("prefix", "fine-tune", lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8), 0.1),
        ("chat-lora", "generate", lambda: LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]), 0.0),
        ("chat-prompt", "generate", lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), 0.0),
    ]


def adalora_optimizer(model: PeftModel, factory: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW) -> Callable[..., torch.optim.Optimizer]:
    """An ``optimizer_factory`` for ``workload.train`` that runs AdaLoRA's rank allocation.

    Its optimizer calls ``update_and_allocate(step)`` after every step, where PEFT prescribes it:
    after ``optimizer.step()``, while the gradients it scores the ranks by are still there.
    """

    def make(params, **kwargs) -> torch.optim.Optimizer:
        optimizer = factory(params, **kwargs)
        steps = itertools.count()
        optimizer.register_step_post_hook(lambda *_: model.base_model.update_and_allocate(next(steps)))
        return optimizer

    return make


def run_demo(args: argparse.Namespace, console: Console) -> dict[str, object]:
    """Run the demo; returns each client's result (losses or generated tokens) for callers and tests."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices for PEFT's prefix cache
    # PEFT's prompt-learning models drop the position ids generate() passes and number positions
    # themselves, as they do on the monolithic model (the equivalence suites' references)
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model_dir) if args.model_dir else save_random_model(
            tiny_config("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=512), Path(scratch) / "base"
        )
        executor = BaseExecutor.from_pretrained(model_dir, dtype=args.dtype, device=args.device, max_wait_s=args.max_wait_ms / 1e3)
    console.print(f"[bold]executor[/bold] {executor}")
    vocab = executor.spec().config["vocab_size"]
    clients = {}
    for index, (name, role, factory, lr) in enumerate(_jobs(args.steps)):
        torch.manual_seed(args.seed + index)
        model = get_peft_model(load_model(executor, device=args.client_device, client_id=name), factory())
        clients[name] = (role, model, AffineTask(vocab, a=1, b=index + 1), lr)

    results: dict[str, object] = {}
    errors: list[BaseException] = []
    with Progress(
        TextColumn("{task.fields[client]:>12} {task.fields[role]:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bars = {}
        for name, (role, _, _, _) in clients.items():
            total = args.steps if role == "fine-tune" else args.requests
            bars[name] = progress.add_task("", total=total, client=name, role=role, status="")

        def run(name: str) -> None:
            role, model, task, lr = clients[name]
            bar = bars[name]
            try:
                if role == "fine-tune":
                    on_step = lambda step, loss: progress.update(bar, advance=1, status=f"loss {loss:.3f}")
                    adalora = model.peft_config["default"].peft_type == PeftType.ADALORA
                    optimizer = adalora_optimizer(model) if adalora else torch.optim.AdamW
                    results[name] = train(model, task, steps=args.steps, lr=lr, seed=args.seed, optimizer_factory=optimizer, on_step=on_step)
                else:
                    on_request = lambda i, tokens: progress.update(bar, advance=1, status=f"-> {tokens[:6].tolist()}")
                    results[name] = generate(model, task, requests=args.requests, new_tokens=12, seed=args.seed, on_request=on_request)
            except BaseException as exc:
                errors.append(exc)
                progress.update(bar, status=f"[red]failed: {exc}")

        threads = [threading.Thread(target=run, args=(name,), name=name) for name in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    _print_summary(console, clients, results, executor)
    return results


def _print_summary(console: Console, clients: dict, results: dict, executor: BaseExecutor) -> None:
    table = Table(title="clients")
    for column in ("client", "role", "result", "tokens/s"):
        table.add_column(column)
    for name, (role, *_rest) in clients.items():
        result = results[name]
        if role == "fine-tune":
            first, last = result.losses[0], result.losses[-1]
            table.add_row(name, role, f"loss {first:.3f} -> {last:.3f}", f"{result.tokens_per_second:,.0f}")
        else:
            table.add_row(name, role, f"{len(result)} requests, {sum(len(t) for t in result)} tokens", "")
    console.print(table)

    stats = Table(title="executor batch statistics (per op type and direction; * = every layer)")
    stats.add_column("op", overflow="fold", min_width=36)
    for column in ("dir", "GEMMs", "req/GEMM", "rows/GEMM", "clients/GEMM", "shared", "wait p50 ms", "wait p99 ms"):
        stats.add_column(column, justify="right")
    for (op, direction), s in executor.stats.by_family().items():
        stats.add_row(
            op, "fwd" if direction is Direction.FORWARD else "bwd", f"{s['gemms']:,}", f"{s['requests_per_gemm']:.2f}", f"{s['rows_per_gemm']:.1f}",
            f"{s['clients_per_gemm']:.2f}", f"{s['shared_gemm_fraction']:.0%}", f"{s['wait_ms_p50']:.3f}", f"{s['wait_ms_p99']:.3f}",
        )
    total = executor.stats.total()
    stats.add_row(
        "[bold]all ops", "", f"{total['gemms']:,}", f"{total['requests_per_gemm']:.2f}", f"{total['rows_per_gemm']:.1f}",
        f"{total['clients_per_gemm']:.2f}", f"{total['shared_gemm_fraction']:.0%}", f"{total['wait_ms_p50']:.3f}", f"{total['wait_ms_p99']:.3f}",
    )
    console.print(stats)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="one executor, four mixed-PEFT fine-tuning clients and two generating clients at once",
        description="Runs one base executor with six concurrent clients (LoRA, IA3, AdaLoRA and prefix tuning fine-tuning; "
        "LoRA and prompt tuning generating), shows per-client progress, then the executor's batch statistics.",
    )
    parser.add_argument("--model-dir", help="a local Hugging Face causal LM (default: a tiny random Llama built locally)")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps per client (default 40)")
    parser.add_argument("--requests", type=int, default=10, help="generation requests per generating client (default 10)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="executor dtype")
    parser.add_argument("--device", default="cpu", help="executor device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="executor: wait up to this long for the other clients to reach an op (default 5; 0: never wait)")
    parser.add_argument("--client-device", default="cpu", help="device of the clients' own work (attention, adapters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=lambda args: run_demo(args, Console()) and 0)
