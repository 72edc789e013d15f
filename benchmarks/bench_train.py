"""Benchmark the trainers: `--model gan` (default, below), `--model ldm` (benchmarks/bench_ldm.py:
latent-diffusion training images/s and peak memory, sampling images/s at 50 steps) or `--model dalle`
(benchmarks/bench_dalle.py: training tokens/s against the transformer step alone on cached tokens,
sampling images/s with and without the KV cache); their options follow. `--nproc 1,N` (gan, ldm) times
whole runs at 1 and N processes under torchrun instead (benchmarks/bench_ddp.py).

`trainers gan` training: images/s and peak GPU memory of the training step.

Times `GanTrainer.train_step` (the D update with lazy R1 at its interval, the G update with L_ConG
through the frozen CLIP, the EMA update) for a fixed number of steps after warm-up, from two sources:

    synthetic   an in-memory batch source (random images and unit-norm conditions): the model's ceiling
    loader      the real cache loader (`trainers.data.loader.make_loader`), only when --cache is given; the
                `vs_synthetic` column is its median throughput over the synthetic row's, same batch size

Sweeps the batch size. Defaults: size small at 64 px with a ViT-B-32 CLIP (random weights: same cost as
pretrained ones) on CUDA; size tiny at 32 px with lafite-tiny on the CPU. With --cache, the resolution,
condition size and CLIP are the cache's. `--steps` should be a multiple of the R1 interval (16) so
the regulariser's cost is counted at its real rate. Peak memory is torch.cuda.max_memory_allocated
over the timed steps ("n/a" on CPU).

Rows are appended to benchmarks/results/train.csv (date, commit, device, size, resolution, clip, source,
batch, steps, median_step_ms, images_per_s, median_images_per_s, vs_synthetic, peak_mem_gib) through
benchmarks/common.py. images_per_s is wall clock over the timed steps; median_images_per_s is batch / median
step time, which a busy shared machine disturbs much less (one stalled step does not move it).

    python benchmarks/bench_train.py                                   # CUDA: small, 64 px, batch 32,64
    python benchmarks/bench_train.py --device cpu --steps 16           # tiny, 32 px, batch 8,32
    python benchmarks/bench_train.py --device cpu --cache cache --condition perturb
    python benchmarks/bench_train.py --model ldm --device cuda --size S --resolution 64
    python benchmarks/bench_train.py --model dalle --device cuda --size small --resolution 64
    python benchmarks/bench_train.py --nproc 1,2                        # data-parallel scaling, CPU
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_rows, print_table, stamp  # noqa: E402

from trainers.families.registry import FAMILIES  # noqa: E402

TABLE_COLUMNS = [
    "size",
    "resolution",
    "clip",
    "source",
    "batch",
    "steps",
    "median_step_ms",
    "images_per_s",
    "median_images_per_s",
    "vs_synthetic",
    "peak_mem_gib",
]
MODELS = tuple(FAMILIES)  # every generator family
DEFAULTS = {  # device type -> (size, resolution, clip model, batch sizes)
    "cuda": ("small", 64, "ViT-B-32", "32,64"),
    "cpu": ("tiny", 32, "lafite-tiny", "8,32"),
}


def synthetic_batches(batch: int, resolution: int, h_dim: int):
    """Ten fixed random batches, cycled: no decoding, no disk (what the loader is compared with)."""
    g = torch.Generator().manual_seed(0)
    pool = [
        {
            "image": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
            "cond": F.normalize(torch.randn(batch, h_dim, generator=g), dim=1),
        }
        for _ in range(10)
    ]
    return itertools.cycle(pool)


def time_steps(
    trainer, batches, warmup: int, steps: int, device: torch.device
) -> tuple[list[float], float, float]:
    """(per-step seconds, total seconds, peak GiB or nan) of `steps` steps after `warmup` ones."""
    for _ in range(warmup):
        trainer.train_step(next(batches))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Restart the R1 phase so every row counts the same number of regularised steps.
    trainer.step = 0
    per_step, t_start = [], time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(next(batches))
        sync()
        per_step.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return per_step, total, peak


def main(argv: list[str] | None = None) -> None:
    choose = argparse.ArgumentParser(add_help=False)
    choose.add_argument("--model", choices=MODELS, default="gan")
    choose.add_argument("--nproc")
    chosen, rest = choose.parse_known_args(argv)
    import importlib

    if chosen.nproc is not None:  # whole runs at 1 and N processes under torchrun
        return importlib.import_module("bench_ddp").main(
            [*rest, "--model", chosen.model, "--nproc", chosen.nproc]
        )
    if chosen.model != "gan":
        return importlib.import_module(f"bench_{chosen.model}").main(rest)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="gan", help="ldm, dalle: see bench_{model}.py")
    parser.add_argument("--nproc", help="1,N: whole runs at 1 and N processes (see bench_ddp.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", help="GAN_SIZES entry (default: small on CUDA, tiny on CPU)")
    parser.add_argument("--resolution", type=int, help="synthetic image size (default: 64 CUDA, 32 CPU)")
    parser.add_argument("--clip-model", help="CLIP for L_ConG (default: ViT-B-32 CUDA, lafite-tiny CPU)")
    parser.add_argument("--batch-sizes", help="comma-separated (default: 32,64 CUDA, 8,32 CPU)")
    parser.add_argument("--steps", type=int, default=32, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cache", type=Path, help="also time the real loader on this cache")
    parser.add_argument("--condition", default="perturb", help="loader condition (perturb needs only embed)")
    parser.add_argument("--workers", type=int, default=0, help="loader processes")
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    args = parser.parse_args(rest)
    warnings.filterwarnings("ignore", message=".*random weights.*")

    from core.clip import load_clip
    from trainers.families.gan.config import GanConfig
    from trainers.families.gan.model import architecture
    from trainers.families.gan.train import GanTrainer

    device = torch.device(args.device)
    size, resolution, clip_model, batch_sizes = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    size, resolution = args.size or size, args.resolution or resolution
    clip_model, clip_pretrained = args.clip_model or clip_model, ""
    if args.cache is not None:  # the cache decides the resolution and the CLIP, for both rows
        from feature_cache.embed_rows import cache_clip
        from trainers.data.loader import LoaderConfig, make_loader

        embedded = cache_clip(args.cache)
        clip_model, clip_pretrained = embedded.clip_model, embedded.clip_pretrained
        resolution = int(
            next(make_loader(LoaderConfig(args.cache, args.condition, batch_size=1)))["image"].shape[-1]
        )
    clip = load_clip(clip_model, clip_pretrained or None, str(device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    rows = []
    for batch in [int(b) for b in (args.batch_sizes or batch_sizes).split(",")]:
        sources = [("synthetic", lambda b=batch: synthetic_batches(b, resolution, clip.dim))]
        if args.cache is not None:
            loader_config = LoaderConfig(args.cache, args.condition, batch_size=batch, workers=args.workers)
            sources.append(("loader", lambda c=loader_config: make_loader(c)))
        synthetic_rate = None
        for source, make_batches in sources:
            torch.manual_seed(0)
            config = GanConfig(size=size, batch_size=batch, device=str(device))
            trainer = GanTrainer(config, architecture(size, resolution, clip.dim), clip, device)
            per_step, total, peak = time_steps(trainer, make_batches(), args.warmup, args.steps, device)
            rate, median_rate = batch * args.steps / total, batch / statistics.median(per_step)
            synthetic_rate = median_rate if source == "synthetic" else synthetic_rate
            rows.append(
                {
                    **stamp(str(device)),
                    "size": size,
                    "resolution": resolution,
                    "clip": clip_model,
                    "source": source,
                    "batch": batch,
                    "steps": args.steps,
                    "median_step_ms": f"{statistics.median(per_step) * 1e3:.1f}",
                    "images_per_s": f"{rate:.1f}",
                    "median_images_per_s": f"{median_rate:.1f}",
                    "vs_synthetic": f"{median_rate / synthetic_rate:.2f}" if source == "loader" else "",
                    "peak_mem_gib": "n/a" if peak != peak else f"{peak:.2f}",
                }
            )
            del trainer
    print_table(rows, TABLE_COLUMNS)
    if not args.no_csv:
        print(f"appended {len(rows)} rows to {append_rows('train', rows)}")


if __name__ == "__main__":
    main()
