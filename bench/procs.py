"""The processes of an experiment: a ``symbiosis serve`` server, workers started together, their memory.

Peak memory is each process's own peak resident set (``VmHWM`` from ``/proc``, read while it runs),
summed over the processes, as the experiments report it. ``MemorySampler`` also records the peak
of the *simultaneous* sums of RSS and of PSS (shared library pages split between processes) and,
where ``nvidia-smi`` runs, of the GPU memory the processes hold.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]

#: A worker body: (its spec, a callable to call once it is ready to start measuring) -> its report.
WorkerFn = Callable[[dict[str, Any], Callable[[], None]], dict[str, Any]]


def peak_rss(pid: int | None = None) -> int:
    """Peak resident set of ``pid`` (default: this process) in bytes; current RSS where /proc has no VmHWM."""
    pid = pid or os.getpid()
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss


def reset_peaks(pids: Sequence[int]) -> list[int]:
    """Each process's peak RSS so far; then reset its peak (VmHWM) to its current RSS (``/proc/PID/clear_refs``)."""
    peaks = []
    for pid in pids:
        peaks.append(peak_rss(pid))
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError as exc:
            raise RuntimeError(f"cannot reset the peak RSS of process {pid} (Linux, same user or root): {exc}") from exc
    return peaks


@dataclass
class MemorySampler:
    """Samples the summed RSS and PSS of a set of processes every ``interval_s`` on a thread; keeps the peaks."""

    interval_s: float = 0.5
    pids: set[int] = field(default_factory=set)
    peak_rss_sum: int = 0
    peak_pss_sum: int = 0
    peak_device_sum: int = 0  # GPU memory of the processes (nvidia-smi), 0 without a GPU

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        """Forget the peaks so far and start again from a sample now."""
        self.peak_rss_sum = self.peak_pss_sum = self.peak_device_sum = 0
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Add one sample now."""
        rss = pss = 0
        for pid in list(self.pids):
            try:
                info = psutil.Process(pid).memory_full_info()
            except psutil.Error:
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        device = gpu_memory_by_pid()
        self.peak_rss_sum = max(self.peak_rss_sum, rss)
        self.peak_pss_sum = max(self.peak_pss_sum, pss)
        self.peak_device_sum = max(self.peak_device_sum, sum(device.get(pid, 0) for pid in list(self.pids)))


def gpu_memory_by_pid() -> dict[int, int]:
    """GPU memory (bytes) each process holds, from ``nvidia-smi``; empty without it."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage: dict[int, int] = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            usage[int(pid)] = usage.get(int(pid), 0) + int(mib) * 2**20
    return usage

@dataclass
class Server:
    """A ``symbiosis serve`` child process."""

    process: subprocess.Popen
    address: str
    log: Path
    parameter_bytes: int = 0  # the executor's frozen weights

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        """The server's batch statistics (cumulative since it started)."""
        from symbiosis.transport import connect

        transport = connect(self.address)
        try:
            return transport.stats()
        finally:
            transport.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a minute) and remove its scratch folder."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        shutil.rmtree(self.log.parent, ignore_errors=True)


def start_server(model_dir: Path, *, device: str = "cpu", dtype: str = "float32", threads: int | None = None,
                 options: Sequence[str] = (), timeout_s: float = 300.0) -> Server:
    """Run ``symbiosis serve model_dir`` on a free port (``threads``: its torch threads) and wait until it serves."""
    scratch = Path(tempfile.mkdtemp(prefix="symbiosis-bench-"))
    ready, log = scratch / "ready.json", scratch / "server.log"
    command = [sys.executable, "-m", "symbiosis.cli.main", "serve", str(model_dir), "--port", "0", "--device", device,
               "--dtype", dtype, "--ready-file", str(ready), *(["--threads", str(threads)] if threads else []), *options]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = log.read_text()[-3000:]
            shutil.rmtree(scratch, ignore_errors=True)
            raise RuntimeError(f"symbiosis serve did not start:\n{tail}")
        time.sleep(0.1)
    info = json.loads(ready.read_text())
    return Server(process, info["address"], log, info.get("parameter_bytes", 0))


def _worker_main(fn: WorkerFn, spec: dict[str, Any], barrier, results) -> None:
    """Run ``fn`` in a fresh process (``spec["threads"]`` torch threads, ``spec["nice"]``); report its result
    (or error), its pid and peak RSS."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    os.nice(spec.get("nice", 0))
    report: dict[str, Any] = {"pid": os.getpid(), "index": spec.get("index", 0)}
    try:
        report.update(fn(spec, lambda: barrier.wait(timeout=1800)))
    except Exception:
        barrier.abort()
        report["error"] = traceback.format_exc(limit=6)
    report["peak_rss_bytes"] = peak_rss()
    results.put(report)


@dataclass
class WorkerRun:
    """What ``run_workers`` measured: each worker's report, the start time and the memory peaks."""

    reports: list[dict[str, Any]]
    started: float
    wall_s: float
    peak_rss_sum: int
    sampled_peak_rss_sum: int
    sampled_peak_pss_sum: int
    sampled_peak_device_sum: int = 0
    load_peak_rss_sum: int | None = None

    @property
    def errors(self) -> list[str]:
        return [r["error"] for r in self.reports if "error" in r]


def run_workers(fn: WorkerFn, specs: Sequence[dict[str, Any]], *, extra_pids: Sequence[int] = (), timeout_s: float = 1800.0,
                reset_peaks_at_start: bool = False) -> WorkerRun:
    """Start one process per spec running ``fn``; all start measuring together once every one is ready.

    ``extra_pids`` (e.g. the server) count towards the memory sums. With ``reset_peaks_at_start``
    the peaks (each process's VmHWM and the sampled sums) cover only the time from the common start,
    when every process has loaded; ``load_peak_rss_sum`` keeps the sum of the peaks before it
    (loading, whose file-backed pages are reclaimable page cache). Raises if a worker fails.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(specs) + 1), ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(fn, dict(spec, index=i), barrier, results), daemon=True) for i, spec in enumerate(specs)]
    with MemorySampler(pids=set(extra_pids)) as sampler:
        for proc in procs:
            proc.start()
            sampler.pids.add(proc.pid)
        try:
            barrier.wait(timeout=timeout_s)
        except threading.BrokenBarrierError:
            pass
        started = time.time()
        load_peaks = reset_peaks([*extra_pids, *(proc.pid for proc in procs)]) if reset_peaks_at_start else None
        if load_peaks is not None:
            sampler.reset()
        reports = []
        for _ in procs:
            reports.append(results.get(timeout=timeout_s))
        wall = time.time() - started
        extra_peaks = [peak_rss(pid) for pid in extra_pids]
    for proc in procs:
        proc.join(60)
    run = WorkerRun(sorted(reports, key=lambda r: r["index"]), started, wall,
                    sum(r["peak_rss_bytes"] for r in reports) + sum(extra_peaks), sampler.peak_rss_sum, sampler.peak_pss_sum,
                    sampler.peak_device_sum, None if load_peaks is None else sum(load_peaks))
    if run.errors:
        raise RuntimeError("a worker failed:\n" + "\n".join(run.errors))
    return run
