"""What every Symbiosis experiment shares: arguments, the benchmark model, machine load, statistics, output.

Each experiment writes ``<name>.json`` (its results plus the machine and its load at measurement
time), ``<name>.md`` (a Markdown table) and PNG charts under ``--out`` (default
``bench/results/<name>/``, gitignored).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
#: The benchmark model: a Llama of 124M parameters (random weights, built locally once, then cached).
FULL_MODEL = dict(hidden_size=768, num_hidden_layers=12, vocab_size=32000)
#: The smoke model: a few seconds per experiment, only to prove the commands run.
SMOKE_MODEL = dict(hidden_size=64, num_hidden_layers=2, vocab_size=512)


def parser(experiment: str, doc: str) -> argparse.ArgumentParser:
    """The options every experiment takes; ``experiment`` names its default output folder."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{experiment}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=BENCH / "results" / experiment, help="output folder (default bench/results/%(prog)s)")
    p.add_argument("--model-dir", type=Path, help="a local Hugging Face causal LM (default: the cached 124M random Llama)")
    p.add_argument("--device", default="cpu", help="device of the executor and the clients (cpu, cuda, cuda:N)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every process (default %(default)s; 1 where several processes share a 2-core VM: "
                        "an OpenMP thread without a core stalls every GEMM)")
    p.add_argument("--server-threads", type=int, metavar="N",
                   help="torch threads of the symbiosis serve process (default: --threads)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=65536, metavar="BYTES",
                   help="glibc M_MMAP_THRESHOLD of every process started (default 64 KiB; 0: glibc's dynamic default). "
                        "The dynamic default keeps freed activation buffers in the heap: measured peak RSS of one "
                        "fine-tuning job 1.34 -> 1.11 GiB (PEFT) and 1.31 -> 0.88 GiB (Symbiosis client)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="every process keeps the memory it frees instead of returning it to the kernel (glibc: no mmap'd "
                        "chunks, no heap trimming). On a VM whose balloon driver reports free pages to the host (this "
                        "one: virtio_balloon, page_reporting_order 9), a freed 64 MiB buffer taken again two seconds later "
                        "faults each page back in from the host: measured 24 us a page, 0.4 s for one LM head's logits")
    p.add_argument("--smoke", action="store_true", help="tiny model and counts: proves the command runs (CI), measures nothing")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="LOAD",
                   help="before measuring, wait (up to 10 min) until the 1-minute load average is below LOAD")
    return p


def checkpoint_dtype(path: Path) -> str | None:
    """The dtype a Hugging Face checkpoint's config says its weights are stored in."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def model_dir(args: argparse.Namespace) -> Path:
    """``--model-dir``, or the benchmark (smoke: tiny) random Llama, built on first use and cached."""
    if args.model_dir is not None:
        return args.model_dir
    sizes = SMOKE_MODEL if args.smoke else FULL_MODEL
    path = CACHE / "llama-h{hidden_size}-l{num_hidden_layers}-v{vocab_size}".format(**sizes)
    if not (path / "config.json").exists():
        from symbiosis.tiny import llama_config, save_random_model

        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        save_random_model(llama_config(**sizes), tmp, seed=0)
        tmp.replace(path)
    return path


def parameter_count(path: Path) -> int:
    """Parameters of the model in ``path`` (built on the meta device: nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return model.num_parameters()


def wait_quiet(max_load: float, timeout_s: float = 600.0) -> float:
    """Wait until the 1-minute load average is below ``max_load`` (0: do not wait); return the load."""
    deadline = time.monotonic() + timeout_s
    while max_load > 0 and os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def start(args: argparse.Namespace) -> dict[str, Any]:
    """Set this process's torch threads; wait for a quiet machine if ``--wait-quiet`` asks; return the load now."""
    import torch

    torch.set_num_threads(args.threads)
    if args.server_threads is None:
        args.server_threads = args.threads
    if args.malloc_mmap_threshold:  # read by glibc when each child process starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.keep_freed_memory:
        keep_freed_memory()
    load = wait_quiet(args.wait_quiet)
    return {"load_average_1min": load, "other_busy_processes": busy_processes()}


#: glibc's mallopt parameters and the environment variables it reads them from at a process's start.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP = {"MALLOC_MMAP_MAX_": (_M_MMAP_MAX, 0), "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 2**31 - 1)}


def keep_freed_memory() -> None:
    """glibc malloc in this process (from now on) and in every child started later serves large
    blocks from its heap and never trims it: freed memory is reused without page faults."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    for name, (param, value) in _KEEP.items():
        os.environ[name] = str(value)
        if not libc.mallopt(param, value):
            raise RuntimeError(f"mallopt({param}, {value}) failed: not glibc's malloc?")


def busy_processes(exclude: set[int] | None = None, min_cpu: float = 20.0) -> list[dict[str, Any]]:
    """Other processes using at least ``min_cpu`` % of a core over half a second (who loads the machine)."""
    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True)), *(exclude or ())}
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= min_cpu:
            busy.append({"pid": p.pid, "cpu_percent": cpu, "command": " ".join(p.info["cmdline"] or [p.info["name"]])[:120]})
    return busy


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """The machine, the software and the load right now (recorded with every result)."""
    import torch

    info = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "memory_available_gib": psutil.virtual_memory().available / 2**30,
        "load_average_1_5_15": os.getloadavg(),
        "other_busy_processes": busy_processes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "smoke": args.smoke,
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def percentiles(samples: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """n, mean, p50, p90, p99 and max of ``samples`` (times ``scale``, e.g. 1e3 for ms)."""
    if not len(samples):
        return {"n": 0}
    a = np.asarray(samples, dtype=float) * scale
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats get 3 significant digits, None an empty cell."""

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def chart(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[Sequence[float], Sequence[float]]],
          *, logx: bool = False, kind: str = "line") -> Path:
    """One PNG: a line per series (``kind="line"``) or grouped bars at the series' x values (``"bar"``)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if kind == "bar":
        labels = list(dict.fromkeys(x for xs, _ in series.values() for x in xs))
        width = 0.8 / max(len(series), 1)
        for i, (name, (xs, ys)) in enumerate(series.items()):
            pos = [labels.index(x) + i * width for x in xs]
            ax.bar(pos, ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], [str(v) for v in labels])
    else:
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=name)
        if logx:
            ax.set_xscale("log", base=2)
            xs_all = sorted({x for xs, _ in series.values() for x in xs})
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(args: argparse.Namespace, name: str, result: dict[str, Any], markdown: str,
          charts: Sequence[Callable[[Path], Path]] = ()) -> Path:
    """Write ``<name>.json`` (result + machine), ``<name>.md`` and each chart under ``args.out``; print the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"experiment": name, "machine": machine(args), **result}
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / f"{name}.md").write_text(markdown)
    for draw in charts:
        draw(args.out)
    print(markdown)
    return args.out
