"""Experiment 5 — executor efficiency: GFLOP/s of the executor's batched GEMMs against bare ``torch.matmul``.

One ``symbiosis serve`` process (``--threads`` torch threads) and N decoding client processes
(each its own adapter: LoRA, IA3, prefix tuning in turn; greedy, batch 1) for ``--duration`` s.
From the server's batch statistics (before/after deltas, per op family): GEMMs, rows, and the
executor's compute time per batch (concatenating the requests' rows, the finiteness check, the
GEMM, handing each caller its rows). Achieved GFLOP/s = 2 x rows x in x out / compute time, by
wall time (what the executor achieves while N + 1 processes share the cores: its thread can be
descheduled inside a batch) and by the computing thread's CPU time (what a batch costs the executor
itself; exact with one server torch thread, the default).

The reference is the bare product alone on the same shapes (each family's mean rows per GEMM,
its weight shape) in this process with the same threads, timed while no client runs: the
machine's limit for those GEMMs, twice — cache-hot (one weight, repeated: its bytes come from the
caches) and with the weights from memory (cycling through 256 MiB of distinct weights), which is
what any forward pass of a model larger than the caches gets, the monolithic model's included.
The bare product is the faster of ``torch.matmul`` and, for forward products of packable CPU
weights, the prepacked product ``--pack-weights`` gives the server (``FrozenOp.pack``), so packing
cannot flatter the executor; the ``torch.matmul``-only rate is reported too.
A third reference is the monolithic model itself: transformers decoding a batch of as many
sequences as the executor's mean rows per GEMM (interpolated between the two whole batch sizes
around it) in this process with the same threads, its linear products' GFLOP/s from
``torch.profiler`` (the products alone, none of the work around them). Its products read every
weight from memory once per token, as the executor's do.
Target: >= 80% of the (cache-hot) bare rate at >= 8 clients.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from bench import common
from bench.procs import run_workers, start_server
from bench.workers import DECODE_METHODS, decode_job, synchronize

TARGET = 0.80
#: Bytes of distinct weights a streamed reference cycles through: several times any CPU's last-level cache or a GPU's L2.
STREAM_BYTES = 256 << 20


def family_shapes(address: str) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear op family (layer indices folded) the server serves."""
    from symbiosis.executor.stats import op_family
    from symbiosis.protocol import OpKind
    from symbiosis.transport import connect

    transport = connect(address)
    try:
        ops = transport.spec().ops
    finally:
        transport.close()
    return {op_family(name): (info.in_features, info.out_features) for name, info in ops.items() if info.kind is OpKind.LINEAR}


def bare_product_s(rows: int, shape: tuple[int, int], direction: str, repeats: int, device: str, dtype: str, *,
                   streamed: bool = False, packed: bool = False) -> float | None:
    """Median seconds of one product of ``rows`` rows with a weight of ``shape`` = (in, out): ``torch.matmul``,
    or (``packed``, forward only) the executor's product on a prepacked weight (``FrozenOp.pack``;
    None where such weights cannot be packed).

    Cache-hot (default): the same weight every time, so from the second product on it is read from
    the CPU's caches. ``streamed``: each product takes the next of enough distinct weights to fill
    ``STREAM_BYTES`` (cycling), so every weight comes from memory, as in a forward pass, where each
    layer's weights are read once per token and the whole model does not fit in any cache.
    """
    from symbiosis.executor.ops import FrozenOp
    from symbiosis.protocol import Direction, OpInfo, OpKind

    n_in, n_out = shape
    dt = getattr(torch, dtype)
    count = max(1, math.ceil(STREAM_BYTES / (n_in * n_out * dt.itemsize))) if streamed else 1
    weights = [torch.randn(n_out, n_in, device=device, dtype=dt) for _ in range(count)]
    x = torch.randn(rows, n_in if direction == "forward" else n_out, device=device, dtype=dt)
    if packed:
        ops = [FrozenOp(OpInfo("w", OpKind.LINEAR, n_in, n_out), w) for w in weights]
        if not all([op.pack() for op in ops]):
            return None
        products = [lambda op=op: op.apply(Direction.FORWARD, x) for op in ops]
    else:
        operands = [w.t() if direction == "forward" else w for w in weights]
        products = [lambda w=w: torch.matmul(x, w) for w in operands]
    times = []
    for i in range(max(repeats, count) + 1):
        product = products[i % count]
        start = time.perf_counter()
        product()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times = times[1:]  # the first product also warms up the kernels
    return sorted(times)[len(times) // 2]


def bare_s(rows: int, shape: tuple[int, int], direction: str, args, *, streamed: bool = False) -> tuple[float, float]:
    """(the fastest bare product's seconds, ``torch.matmul``'s seconds) for one GEMM of this shape."""
    matmul = bare_product_s(rows, shape, direction, args.repeats, args.device, args.dtype, streamed=streamed)
    packed = bare_product_s(rows, shape, direction, args.repeats, args.device, args.dtype, streamed=streamed, packed=True) \
        if direction == "forward" else None
    return (matmul if packed is None else min(matmul, packed)), matmul


class MonolithicReference:
    """The monolithic model (transformers, loaded once) as a reference: the GFLOP/s of its linear
    products while it greedily decodes a batch of sequences, measured once per batch size."""

    def __init__(self, path: Path, args) -> None:
        from transformers import AutoModelForCausalLM

        self._args = args
        self._model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
        self._rates: dict[int, float] = {}

    def gflops(self, rows: float) -> float:
        """The rate at a batch of ``rows`` sequences (a fractional ``rows``: interpolated between
        the batch sizes around it)."""
        low, high = max(1, math.floor(rows)), max(1, math.ceil(rows))
        for batch in {low, high} - self._rates.keys():
            self._rates[batch] = self._decode_gflops(batch)
        return self._rates[low] + (self._rates[high] - self._rates[low]) * (rows - low)

    def _decode_gflops(self, batch: int) -> float:
        """GFLOP/s of the linear products (``aten::mm``/``addmm`` of ``batch`` rows: the decode
        steps' products) while decoding ``batch`` sequences of ``args.new_tokens`` tokens."""
        from torch.profiler import ProfilerActivity, profile

        model, device, new_tokens = self._model, self._args.device, self._args.new_tokens
        ids = torch.randint(0, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
        options = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
        cuda = device.startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **options)  # warm-up
            synchronize(device)
            with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
                synchronize(device)
        flops = seconds = 0.0
        for event in prof.events():
            if event.name in ("aten::mm", "aten::addmm") and event.flops and event.input_shapes[-2][:1] == [batch]:
                flops += event.flops
                seconds += (event.device_time_total if cuda else event.cpu_time_total) / 1e6
        return flops / seconds / 1e9


def delta(before: dict, after: dict) -> dict[tuple[str, str], dict[str, float]]:
    """Per (op family, direction): GEMMs, rows and compute seconds between two stats snapshots."""
    def index(stats: dict) -> dict:
        return {(o["op"], o["direction"]): o for o in stats["ops"]}

    b, out = index(before), {}
    for key, o in index(after).items():
        prev = b.get(key, {"gemms": 0, "rows": 0, "compute_ms_total": 0.0, "compute_cpu_ms_total": 0.0})
        gemms = o["gemms"] - prev["gemms"]
        if gemms > 0:
            out[key] = {"gemms": gemms, "rows": o["rows"] - prev["rows"], "compute_s": (o["compute_ms_total"] - prev["compute_ms_total"]) / 1e3,
                        "cpu_s": (o["compute_cpu_ms_total"] - prev["compute_cpu_ms_total"]) / 1e3}
    return out


def measure(n: int, server, shapes: dict, monolithic_reference: MonolithicReference, args) -> dict:
    specs = [{"system": "symbiosis", "target": server.address, "device": args.device, "threads": args.threads, "role": "inference",
              "method": DECODE_METHODS[i % len(DECODE_METHODS)], "requests": 10**6, "prompt_len": 16, "new_tokens": args.new_tokens,
              "duration_s": args.duration} for i in range(n)]
    before = server.stats()
    run_workers(decode_job, specs)
    per_family = delta(before, server.stats())
    flops = bare_flops = bare_total = matmul_total = streamed_total = exec_s = cpu_s = gemms = rows = 0.0
    families = []
    for (family, direction), d in sorted(per_family.items()):
        n_in, n_out = shapes[family]
        mean_rows = max(1, round(d["rows"] / d["gemms"]))
        f, bf = 2.0 * d["rows"] * n_in * n_out, 2.0 * mean_rows * n_in * n_out * d["gemms"]
        bare, matmul = (t * d["gemms"] for t in bare_s(mean_rows, shapes[family], direction, args))
        streamed = bare_s(mean_rows, shapes[family], direction, args, streamed=True)[0] * d["gemms"]
        families.append({"op": family, "direction": direction, "gemms": d["gemms"], "rows_per_gemm": d["rows"] / d["gemms"],
                         "executor_gflops": f / d["compute_s"] / 1e9, "executor_cpu_gflops": f / d["cpu_s"] / 1e9 if d["cpu_s"] else None,
                         "bare_gflops": bf / bare / 1e9, "matmul_gflops": bf / matmul / 1e9, "streamed_gflops": bf / streamed / 1e9})
        flops, bare_flops, exec_s, cpu_s = flops + f, bare_flops + bf, exec_s + d["compute_s"], cpu_s + d["cpu_s"]
        bare_total, matmul_total, streamed_total = bare_total + bare, matmul_total + matmul, streamed_total + streamed
        gemms, rows = gemms + d["gemms"], rows + d["rows"]
    executor_gflops, bare_gflops, streamed_gflops = flops / exec_s / 1e9, bare_flops / bare_total / 1e9, bare_flops / streamed_total / 1e9
    matmul_gflops = bare_flops / matmul_total / 1e9
    cpu_gflops = flops / cpu_s / 1e9
    monolithic = monolithic_reference.gflops(rows / gemms)
    return {"clients": n, "gemms": gemms, "rows_per_gemm": rows / gemms, "executor_gflops": executor_gflops, "bare_gflops": bare_gflops,
            "efficiency": executor_gflops / bare_gflops, "matmul_gflops": matmul_gflops,
            "matmul_efficiency": executor_gflops / matmul_gflops, "executor_cpu_gflops": cpu_gflops, "cpu_efficiency": cpu_gflops / bare_gflops,
            "streamed_gflops": streamed_gflops, "streamed_efficiency": executor_gflops / streamed_gflops,
            "streamed_cpu_efficiency": cpu_gflops / streamed_gflops,
            "monolithic_gflops": monolithic, "monolithic_efficiency": executor_gflops / monolithic, "monolithic_cpu_efficiency": cpu_gflops / monolithic,
            "executor_compute_s": exec_s, "executor_cpu_s": cpu_s, "families": families}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("executor_efficiency", __doc__)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of decoding per client count")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=50, help="timings per bare product shape")
    p.add_argument("--pack-weights", action="store_true", help="the server keeps prepacked weights for its (forward) products (serve --pack-weights forward)")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.duration, args.new_tokens, args.repeats = [1, 2], 1.0, 4, 5
    path = common.model_dir(args)
    start = common.start(args)
    server = start_server(path, device=args.device, dtype=args.dtype, threads=args.server_threads,
                          options=["--pack-weights", "forward"] if args.pack_weights else [])
    try:
        shapes = family_shapes(server.address)
        reference = MonolithicReference(path, args)
        rows = [measure(n, server, shapes, reference, args) for n in args.clients]
    finally:
        server.stop()
    at8 = [r for r in rows if r["clients"] >= 8]
    met = bool(at8) and all(r["efficiency"] >= TARGET for r in at8)
    result = {"model_dir": str(path), "parameters": common.parameter_count(path), "load_at_start": start,
              "config": {k: getattr(args, k) for k in ("clients", "duration", "new_tokens", "repeats", "threads", "server_threads", "pack_weights")},
              "rows": rows, "targets": {"efficiency_min_at_8_clients": TARGET, "met": met}}
    md = common.table(["clients", "rows per GEMM", "executor GFLOP/s: wall / its CPU time",
                       "bare GFLOP/s: cache-hot / weights from memory / torch.matmul cache-hot",
                       "efficiency vs cache-hot: wall / CPU time", "efficiency vs weights from memory: wall / CPU time",
                       "efficiency vs torch.matmul cache-hot", "monolithic model's products GFLOP/s",
                       "efficiency vs the monolithic model: wall / CPU time"],
                      [[r["clients"], r["rows_per_gemm"], f"{r['executor_gflops']:.2f} / {r['executor_cpu_gflops']:.2f}",
                        f"{r['bare_gflops']:.2f} / {r['streamed_gflops']:.2f} / {r['matmul_gflops']:.2f}",
                        f"{r['efficiency']:.0%} / {r['cpu_efficiency']:.0%}",
                        f"{r['streamed_efficiency']:.0%} / {r['streamed_cpu_efficiency']:.0%}", f"{r['matmul_efficiency']:.0%}",
                        f"{r['monolithic_gflops']:.2f}", f"{r['monolithic_efficiency']:.0%} / {r['monolithic_cpu_efficiency']:.0%}"] for r in rows])
    md += (f"\nServer: {'prepacked' if args.pack_weights else 'plain'} weights. Bare: the faster of torch.matmul and the prepacked product.\n"
           f"Target: >= {TARGET:.0%} of the cache-hot bare rate at >= 8 clients (by wall time): {'met' if met else 'missed'}.\n")
    ns = [r["clients"] for r in rows]

    def draw_rate(out: Path) -> Path:
        return common.chart(out / "executor_efficiency.png", "GEMM rate: executor vs the bare product and the monolithic model (same shapes)", "clients", "GFLOP/s",
                            {"executor": (ns, [r["executor_gflops"] for r in rows]), "bare product, cache-hot": (ns, [r["bare_gflops"] for r in rows]),
                             "bare product, weights from memory": (ns, [r["streamed_gflops"] for r in rows]),
                             "monolithic model's products": (ns, [r["monolithic_gflops"] for r in rows])},
                            logx=True)

    def draw_rows(out: Path) -> Path:
        return common.chart(out / "executor_rows_per_gemm.png", "rows per GEMM", "clients", "rows",
                            {"rows per GEMM": (ns, [r["rows_per_gemm"] for r in rows])}, logx=True)

    common.write(args, "executor_efficiency", result, md, [draw_rate, draw_rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
