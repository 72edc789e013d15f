"""Torch threads on a small or shared CPU: torch's default count against the count the CLIs choose
(core/processes.py), on a quiet machine and beside busy processes.

The workload is a fixed GAN-discriminator-sized training step (3 convs and a linear head, Adam, batch 32
at 32 px), timed for `--seconds` after warm-up. The sweep axis is the number of busy processes started
beside it (`--busy 0,1`: pure-Python spin loops, each keeping one core busy): they stand for the worker
processes a command starts (decoders, loader workers), which the policy counts, or for another job,
which it cannot see (there `--threads 1` is the fix; that is the `policy` row's thread count whenever
busy >= 1 on 2 cores). Arms per load, in the same run:

    torch default   torch.get_num_threads() at start-up (run without OMP_NUM_THREADS to see it)
    policy          available_cpus() // (1 + busy), at least 1: what `limit_threads(busy)` picks when the
                    busy processes are the command's own workers

Rows are appended to benchmarks/results/threads.csv with date, commit, device, the CPUs available, and
the 1-minute load average before and after each arm (other people's jobs share small machines: read
`load_before` before trusting a row). median_images_per_s (batch / median step) is disturbed less by a
stalled step than images_per_s (wall clock).

    python benchmarks/bench_threads.py                       # busy 0,1; 5 s per arm: about 40 s
    python benchmarks/bench_threads.py --busy 0,1,2 --seconds 3
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_threads.py   # idle threads sleep at once
    GOMP_SPINCOUNT=10000 python benchmarks/bench_threads.py      # ... after a short spin (the CLIs' default)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import append_rows, print_table, stamp  # noqa: E402

from core.processes import available_cpus  # noqa: E402

TORCH_DEFAULT = torch.get_num_threads()  # before anything here sets it
COLUMNS = ["busy", "arm", "threads", "steps", "median_step_ms", "images_per_s", "median_images_per_s"]
COLUMNS += ["omp_env", "load_before", "load_after"]
OMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # how idle OpenMP threads wait (read when torch loads)


def make_step(batch: int, size: int):
    """One discriminator-like training step on a fixed batch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Flatten(),
        torch.nn.Linear(128 * (size // 4) ** 2, 1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size)  # [B, 3, S, S]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        net(images).square().mean().backward()
        opt.step()

    return step


def time_arm(step, threads: int, seconds: float, warmup: int) -> tuple[int, float, float]:
    """(steps, wall seconds, median step seconds) with `threads` torch threads."""
    torch.set_num_threads(threads)
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return len(times), time.perf_counter() - start, statistics.median(times)


def start_busy(n: int) -> list[subprocess.Popen]:
    spin = [sys.executable, "-c", "while True: pass"]
    return [subprocess.Popen(spin, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(n)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", default="0,1", help="Busy processes beside the workload (sweep).")
    parser.add_argument("--seconds", type=float, default=5.0, help="Timed seconds per arm.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps per arm.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="Image side in pixels.")
    args = parser.parse_args(argv)
    busy_counts = [int(b) for b in args.busy.split(",")]
    if "OMP_NUM_THREADS" in os.environ:
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}: the default arm is that, not torch's")
    cpus = available_cpus()
    step = make_step(args.batch, args.size)
    base = {**stamp("cpu"), "cpus": cpus, "torch_default": TORCH_DEFAULT, "batch": args.batch}
    base |= {"size": args.size, "seconds": args.seconds}
    base["omp_env"] = " ".join(f"{k}={os.environ[k]}" for k in OMP_ENV if k in os.environ) or "unset"
    rows = []
    for busy in busy_counts:
        spinners = start_busy(busy)
        try:
            time.sleep(0.5)  # let them reach full speed
            for arm, threads in (("torch default", TORCH_DEFAULT), ("policy", max(1, cpus // (1 + busy)))):
                load_before = os.getloadavg()[0]
                steps, wall, median = time_arm(step, threads, args.seconds, args.warmup)
                rows.append(
                    {
                        **base,
                        "busy": busy,
                        "arm": arm,
                        "threads": threads,
                        "steps": steps,
                        "median_step_ms": round(median * 1e3, 2),
                        "images_per_s": round(steps * args.batch / wall, 1),
                        "median_images_per_s": round(args.batch / median, 1),
                        "load_before": round(load_before, 2),
                        "load_after": round(os.getloadavg()[0], 2),
                    }
                )
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    print(f"{base['device']}, {cpus} CPUs available, torch default {TORCH_DEFAULT} threads")
    print_table(rows, COLUMNS)
    print(f"appended to {append_rows('threads', rows)}")
    return rows


if __name__ == "__main__":
    main()
