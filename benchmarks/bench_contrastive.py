"""Benchmark the fused contrastive loss (forward + backward) against chunked and naive torch.

Sweeps N (powers of two, D = 512 by default) for:
    triton bf16 / fp32      kernels.contrastive_loss(backend="triton")    (CUDA only)
    chunked bf16 / fp32     kernels.contrastive_loss(backend="torch")
    naive bf16 / fp32       N x N logits + F.cross_entropy both ways, autograd (the baseline)
and reports median ms of forward + backward, model TFLOP/s counted as 4 N^2 D (one N x N x D matmul
forward, one backward; the fused kernels really do 6 N^2 D up to D = 512, since the backward recomputes
the logits), and GPU memory of the warm-up call ("n/a" on CPU): `peak_mem_gib` is
torch.cuda.max_memory_allocated with the inputs h and f included, `work_mem_gib` the same peak minus
what was allocated before the call (the inputs), i.e. what the loss itself needs, dH included.
At N = 2**20, D = 512 the bf16 inputs alone are 2 GiB, so the "N = 1M under 2 GiB" target reads
work_mem_gib.
An implementation that runs out of memory is recorded as "OOM" and not tried at larger N; one whose
single warm-up call takes longer than --time-budget seconds is recorded once as "slow" and not
tried at larger N either.

Rows are appended to benchmarks/results/contrastive.csv (columns: date, commit, device, impl, dtype,
N, D, median_ms, tflops, peak_mem_gib, status, work_mem_gib, config) through benchmarks/common.py.

    python benchmarks/bench_contrastive.py                       # CUDA, N = 4096 .. 1048576
    python benchmarks/bench_contrastive.py --device cpu --sizes 1024,2048
    python benchmarks/bench_contrastive.py --sizes 32768,65536 --impls triton --set num_stages=2

`--set` overrides fields of the default `TritonConfig` (kernels/contrastive_triton.py) for every triton
row, for tuning on the GPU; `python -m kernels.compile_check` shows offline whether a config spills.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_rows, print_table, stamp  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (impl, dtype) in table order; triton rows are dropped on CPU.
IMPLS = [
    ("triton", "bf16"),
    ("triton", "fp32"),
    ("chunked", "bf16"),
    ("chunked", "fp32"),
    ("naive", "bf16"),
    ("naive", "fp32"),
]
TABLE_COLUMNS = ["impl", "dtype", "N", "D", "median_ms", "tflops", "peak_mem_gib", "work_mem_gib", "status"]


def naive_loss(h: torch.Tensor, f: torch.Tensor, tau: float) -> torch.Tensor:
    """The materialising baseline: N x N logits in the input dtype, autograd keeps them."""
    logits = h @ f.T / tau  # N x N
    target = torch.arange(h.shape[0], device=h.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def make_step(
    impl: str, h: torch.Tensor, f: torch.Tensor, tau: float, overrides: dict | None = None
) -> Callable[[], None]:
    from kernels import contrastive_loss

    if impl == "naive":

        def loss_fn():
            return naive_loss(h, f, tau)
    else:
        backend = {"triton": "triton", "chunked": "torch"}[impl]
        config = None
        if impl == "triton" and overrides:
            from kernels.contrastive_triton import default_config

            config = dataclasses.replace(default_config(h.dtype, h.shape[1]), **overrides)

        def loss_fn():
            return contrastive_loss(h, f, tau, backend=backend, triton_config=config)

    def step():
        # autograd.grad instead of backward(): no gradient accumulation into h.grad between reps.
        torch.autograd.grad(loss_fn(), h)

    return step


def time_step(step: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median milliseconds of one forward + backward (the step has already been warmed up once)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, return_mode="median"))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "memory" in str(exc).lower()  # CPU allocator failures


def run_one(
    impl: str,
    dtype_name: str,
    n: int,
    dim: int,
    tau: float,
    device: torch.device,
    reps: int,
    time_budget_s: float,
    overrides: dict | None = None,
) -> dict:
    """One measurement: median_ms, tflops, peak_mem_gib, work_mem_gib, status; None = not measured."""
    dtype = DTYPES[dtype_name]
    h = f = step = None
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        h = F.normalize(torch.randn(n, dim, device=device, generator=gen), dim=1).to(dtype)
        f = F.normalize(torch.randn(n, dim, device=device, generator=gen), dim=1).to(dtype)
        h.requires_grad_(True)
        step = make_step(impl, h, f, tau, overrides)
        before = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step()  # warm-up: triton compilation, cuBLAS heuristics, allocator
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_ms = (time.perf_counter() - start) * 1e3
        # Peak of the warm-up call, read before do_bench adds its 256 MB L2-flush buffer.
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        work = None if peak is None else (peak - before) / 2**30
        peak = None if peak is None else peak / 2**30
        if first_ms > time_budget_s * 1e3:
            median_ms, status = first_ms, "slow"
        else:
            median_ms, status = time_step(step, device, reps), "ok"
        tflops = 4.0 * n * n * dim / (median_ms * 1e-3) / 1e12
        return {
            "median_ms": median_ms,
            "tflops": tflops,
            "peak_mem_gib": peak,
            "work_mem_gib": work,
            "status": status,
        }
    except Exception as exc:  # only out-of-memory is expected; everything else is re-raised
        if not is_oom(exc):
            raise
        return {
            "median_ms": None,
            "tflops": None,
            "peak_mem_gib": None,
            "work_mem_gib": None,
            "status": "OOM",
        }
    finally:
        del h, f, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_speedups(rows: list[dict]) -> None:
    ms = {(r["impl"], r["dtype"], r["N"]): float(r["median_ms"]) for r in rows if r["status"] == "ok"}
    lines = []
    for n in sorted({r["N"] for r in rows}):
        fast, base = ms.get(("triton", "bf16", n)), ms.get(("naive", "fp32", n))
        if fast and base:
            lines.append(f"  N={n:>8}: {base / fast:7.2f}x")
    if lines:
        print("\nspeedup of triton bf16 over naive fp32 (forward + backward, median ms):")
        print("\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_sizes = ",".join(str(2**k) for k in range(12, 21))  # 4096 .. 1048576
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=default_sizes, help="comma-separated N values")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tau", type=float, default=0.07)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=60.0,
        help="seconds; a warm-up call slower than this is recorded once and larger N skipped",
    )
    p.add_argument(
        "--impls",
        default=",".join(sorted({impl for impl, _ in IMPLS})),
        help="comma-separated subset of: triton, chunked, naive",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        default="",
        type=parse_overrides,
        help="TritonConfig fields for the triton rows, e.g. fwd_block_n=64,num_stages=2",
    )
    return p.parse_args(argv)


def parse_overrides(text: str) -> dict[str, int]:
    """'a=1,b=2' -> {'a': 1, 'b': 2}, checked against the TritonConfig fields."""
    fields = {f.name for f in dataclasses.fields(_triton_config_class())}
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in fields or not value.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"expected NAME=INT with NAME in {sorted(fields)}, got {item!r}")
        overrides[name] = int(value)
    return overrides


def _triton_config_class():
    from kernels.contrastive_triton import TritonConfig

    return TritonConfig


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    chosen = {name.strip() for name in args.impls.split(",") if name.strip()}
    if not chosen <= {impl for impl, _ in IMPLS}:
        raise SystemExit(f"--impls: unknown {sorted(chosen - {impl for impl, _ in IMPLS})}")
    impls = [(i, d) for i, d in IMPLS if i in chosen]
    if args.overrides:
        print(f"triton config overrides: {args.overrides}")
    if device.type != "cuda":
        print("triton rows skipped: the compiled triton backend needs a CUDA device")
        impls = [(i, d) for i, d in impls if i != "triton"]
    base = stamp(args.device)
    print(f"device: {base['device']}  D={args.dim}  tau={args.tau}  N={sizes}\n")

    rows: list[dict] = []
    stopped: dict[tuple[str, str], str] = {}  # (impl, dtype) -> the status that ended its sweep
    for n in sizes:
        for impl, dtype_name in impls:
            if (impl, dtype_name) in stopped:
                result = {
                    "median_ms": None,
                    "tflops": None,
                    "peak_mem_gib": None,
                    "work_mem_gib": None,
                    "status": f"skipped after {stopped[(impl, dtype_name)]}",
                }
            else:
                result = run_one(
                    impl,
                    dtype_name,
                    n,
                    args.dim,
                    args.tau,
                    device,
                    args.reps,
                    args.time_budget,
                    args.overrides,
                )
                if result["status"] in ("OOM", "slow"):
                    stopped[(impl, dtype_name)] = result["status"]
            row = {
                **base,
                "impl": impl,
                "dtype": dtype_name,
                "N": n,
                "D": args.dim,
                "median_ms": _fmt(result["median_ms"], 3),
                "tflops": _fmt(result["tflops"], 3),
                "peak_mem_gib": _fmt(result["peak_mem_gib"], 3) if device.type == "cuda" else "n/a",
                "work_mem_gib": _fmt(result["work_mem_gib"], 3) if device.type == "cuda" else "n/a",
                "config": ";".join(f"{k}={v}" for k, v in args.overrides.items()) if impl == "triton" else "",
                "status": result["status"],
            }
            rows.append(row)
            print(
                f"  {impl:<8} {dtype_name:<5} N={n:<8} {row['status']:<5} {row['median_ms']} ms", flush=True
            )

    print()
    print_table(rows, TABLE_COLUMNS)
    print_speedups(rows)
    path = append_rows("contrastive", rows)
    print(f"\nrows appended to {path}")


if __name__ == "__main__":
    main()
