"""Benchmark data-parallel training: `trainers gan` (or `ldm`) images/s at 1 and N processes under
torchrun, at the same global batch (`python benchmarks/bench_train.py --nproc 1,2` runs this).

Each row is one real training run of the command users launch (`torchrun --nproc_per_node N -m trainers
...`; one plain process for N = 1) on a cache: the synthetic world's, built here at 32 px with lafite-tiny
(random weights) unless --cache is given. Its throughput is read from the run's own metrics.jsonl: the
trainers log cumulative global images/s at every 10th step, and the rate between the first and the last
logged step leaves out start-up (process launch, rendezvous, model build, the first steps' warm-up) and
the final checkpoint. `scaling` is a row's images/s over the 1-process row's, and `efficiency` that over N.

On the CPU each process gets `--threads` intra-op threads (default 1: one core per process, as one GPU
per process), so the rows measure what adding processes and their cores buys, all-reduce included. On
CUDA each process takes its `cuda:LOCAL_RANK`.

`--compile BACKEND` trains with `--compile` (each run compiles in its first steps, before the rate is read),
so an eager and a compiled invocation give the compiler's speed-up.

Rows are appended to benchmarks/results/ddp.csv (date, commit, device, model, size, resolution, compile,
batch, steps, nproc, threads, images_per_s, scaling, efficiency).

    python benchmarks/bench_ddp.py --nproc 1,2                      # CPU: gan tiny, global batch 32
    python benchmarks/bench_ddp.py --model ldm --nproc 1,2
    python benchmarks/bench_ddp.py --device cuda --size small --batch-size 256 --nproc 1,8 --cache cache
    python benchmarks/bench_ddp.py --device cuda --size small --resolution 64 --nproc 1 --compile inductor
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, print_table, stamp  # noqa: E402

TABLE_COLUMNS = [
    *("model", "size", "resolution", "compile", "batch", "steps", "nproc", "threads"),
    *("images_per_s", "scaling", "efficiency"),
]
MODELS = ("gan", "ldm")


def run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{proc.stderr[-3000:]}")


def synthetic_cache(root: Path, n: int, resolution: int, env: dict[str, str]) -> Path:
    """A synthetic-world cache (embed only) at `resolution` px: what the trainers' tests train on, larger."""
    pipeline = [sys.executable, "-c", "from cli.pipeline import main; main()"]
    world = ["--n", n, "--shard-size", 256, "--image-size", resolution]
    run([*pipeline, "synth", "--out", root / "w", *world], env)
    run(
        [*pipeline, "embed", f"{root / 'w'}/*.tar", "--cache", root / "c", "--clip-model", "lafite-tiny"]
        + ["--clip-pretrained", "", "--image-size", resolution, "--workers", 0],
        env,
    )
    return root / "c"


def tiny_vae(cache: Path, out: Path, env: dict[str, str]) -> Path:
    """The VAE an ldm row needs: a few steps are enough, only the diffusion step is timed."""
    run(
        [sys.executable, "-m", "trainers", "vae", "--cache", cache, "--out", out, "--size", "tiny"]
        + ["--steps", 20, "--batch-size", 16, "--device", "cpu"],
        env,
    )
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def steady_rate(metrics: Path, batch: int) -> float:
    """Global images/s between the first and the last logged step, from the cumulative rates."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    logged = [(m["step"], m["images_per_s"]) for m in lines if "images_per_s" in m]
    (s0, r0), (s1, r1) = logged[0], logged[-1]
    seconds = s1 * batch / r1 - s0 * batch / r0  # elapsed at the last line minus at the first
    return (s1 - s0) * batch / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="gan")
    parser.add_argument("--nproc", default="1,2", help="comma-separated process counts (first: the baseline)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (rates from step 10 on)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    parser.add_argument("--images", type=int, default=1024, help="synthetic cache size (without --cache)")
    parser.add_argument("--resolution", type=int, default=32, help="synthetic cache image size")
    parser.add_argument("--compile", help="train with --compile BACKEND (inductor), else eager")
    parser.add_argument("--cache", type=Path, help="train on this cache instead of a synthetic one")
    parser.add_argument("--vae", type=Path, help="ldm: this VAE (default: a 20-step tiny one)")
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.nproc.split(",")]
    if args.steps < 20:
        parser.error("--steps must be at least 20: the rate is read between logged steps 10 and the last")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        tmp = Path(tmp)
        cache = args.cache or synthetic_cache(tmp / "cache", args.images, args.resolution, env)
        common = [
            "--cache",
            cache,
            "--size",
            args.size,
            "--steps",
            args.steps,
            "--batch-size",
            args.batch_size,
        ]
        common += ["--condition", "perturb", "--device", args.device, "--checkpoint-every", 0]
        common += ["--compile", args.compile] if args.compile else []
        if args.model == "gan":
            common += ["--sample-every", 0]
        else:
            common += ["--vae", args.vae or tiny_vae(cache, tmp / "vae", env)]
        baseline = None
        for n in counts:
            out = tmp / f"run-{n}"
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n]
            launch = [*launch, "-m", "trainers"] if n > 1 else [sys.executable, "-m", "trainers"]
            run([*launch, args.model, *common, "--out", out], env)
            (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
            rate = steady_rate(run_dir / "metrics.jsonl", args.batch_size)
            baseline = baseline or rate
            rows.append(
                {
                    **stamp(args.device),
                    "model": args.model,
                    "size": args.size,
                    "resolution": "" if args.cache else args.resolution,
                    "compile": args.compile or "",
                    "batch": args.batch_size,
                    "steps": args.steps,
                    "nproc": n,
                    "threads": args.threads if args.device == "cpu" else "",
                    "images_per_s": f"{rate:.1f}",
                    "scaling": f"{rate / baseline:.2f}",
                    "efficiency": f"{rate / baseline * counts[0] / n:.2f}",
                }
            )
    print_table(rows, TABLE_COLUMNS)
    if not args.no_csv:
        print(f"appended {len(rows)} rows to {append_rows('ddp', rows)}")


if __name__ == "__main__":
    main()
