"""Benchmark `pipeline embed` end to end against the image encoder alone, in the same run.

End to end: JPEG WebDataset shards -> read, decode, crop/resize (DataLoader workers) -> CLIP -> tar +
Parquet + manifests. Encoder alone: the same images, already decoded and on the device, through
`encode_images` in the same batch size. The ratio says how much of the encoder's speed survives.

    python benchmarks/bench_embed.py                       # CPU, lafite-tiny, small
    python benchmarks/bench_embed.py --device cuda --model ViT-B-32 --n-images 50000 --workers 16
    python benchmarks/bench_embed.py --daemon-arms         # decoding inside a Dask worker, three ways

`--daemon-arms` adds end-to-end runs in a child process, as in a Dask worker: `processes` (a non-daemonic
child: DataLoader worker processes), `threads` (a daemonic child, as Dask workers are: `shard_loader`
decodes with threads) and `inline` (a daemonic child, --workers 0). Arms alternate within each rep.

Source images are synthetic-world scenes rendered at --source-size (about 14 KB JPEGs at 256 px); a
few hundred unique ones are cycled so that generating the input takes seconds, not minutes.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, print_table, stamp  # noqa: E402


def make_shards(
    directory: Path, n_images: int, source_size: int, shard_size: int, n_unique: int
) -> list[str]:
    from PIL import Image

    from core.tars import add_member
    from world.synth import make_sample

    unique = []
    for i in range(n_unique):
        sample = make_sample(seed=7, index=i, image_size=source_size)
        img = Image.open(io.BytesIO(sample["jpg"]))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        unique.append(buf.getvalue())
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard_start in range(0, n_images, shard_size):
        path = directory / f"{len(paths):05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(shard_start, min(shard_start + shard_size, n_images)):
                add_member(tar, f"{i:09d}.jpg", unique[i % n_unique])
        paths.append(str(path))
    return paths, unique


def encoder_only(bundle, unique: list[bytes], n_images: int, batch_size: int, image_size: int, reps: int):
    """img/s of encode_images on pre-decoded uint8 batches already on the device (median of reps)."""
    import numpy as np
    import torch
    from PIL import Image

    from core.clip import encode_images
    from inputs.images import fit_square

    pixels = [np.asarray(fit_square(Image.open(io.BytesIO(b)).convert("RGB"), image_size)) for b in unique]
    stack = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    batch = stack[torch.arange(batch_size) % len(unique)].to(bundle.device)
    n_batches = max(1, n_images // batch_size)
    encode_images(bundle, batch)  # warm-up: kernels, autotuning
    times = []
    for _ in range(reps):
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n_batches):
            encode_images(bundle, batch)
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return n_batches * batch_size / statistics.median(times)


def _embed_in_child(config, results) -> None:
    from core.clip import cached_clip
    from pipeline.embed.stage import run_embed

    cached_clip(config.clip_model, config.clip_pretrained, config.device)  # model load is not timed
    t = time.perf_counter()
    result = run_embed(config)
    results.put((time.perf_counter() - t, result.rows_written))


def daemon_arms(config, n_images: int, workers: int, reps: int) -> dict[str, float]:
    """img/s (median of reps) of run_embed in a child process: processes, threads, or inline decoding."""
    from dataclasses import replace

    ctx = multiprocessing.get_context("spawn")  # what Dask workers use
    arms = {"processes": (False, workers), "threads": (True, workers), "inline": (True, 0)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for rep in range(reps):
        for name, (daemon, arm_workers) in arms.items():
            cache = Path(str(config.cache) + f"-{name}{rep}")
            results = ctx.Queue()
            child = ctx.Process(
                target=_embed_in_child,
                args=(replace(config, cache=cache, workers=arm_workers), results),
                daemon=daemon,
            )
            child.start()
            seconds, written = results.get()
            child.join()
            assert written == n_images, (name, written)
            times[name].append(seconds)
    return {name: n_images / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="lafite-tiny")
    parser.add_argument("--n-images", type=int, default=2048)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=256, help="stored size (= source: kept as-is)")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--unique", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--daemon-arms", action="store_true", help="also time decoding as in a Dask worker")
    args = parser.parse_args()

    from core.clip import cached_clip
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.stage import run_embed

    bundle = cached_clip(args.model, "", args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards, unique = make_shards(
            tmp / "src", args.n_images, args.source_size, args.shard_size, args.unique
        )
        enc = encoder_only(bundle, unique, args.n_images, args.batch_size, args.image_size, args.reps)
        e2e_times = []
        for rep in range(args.reps):
            config = EmbedConfig(
                inputs=tuple(shards),
                cache=tmp / f"cache{rep}",
                clip_model=args.model,
                clip_pretrained="",
                image_size=args.image_size,
                batch_size=args.batch_size,
                workers=args.workers,
                device=args.device,
            )
            t = time.perf_counter()
            result = run_embed(config)
            e2e_times.append(time.perf_counter() - t)
            assert result.rows_written == args.n_images, result
        e2e = args.n_images / statistics.median(e2e_times)
        in_child = daemon_arms(config, args.n_images, args.workers, args.reps) if args.daemon_arms else {}
    base = stamp(args.device)
    common = {
        "model": args.model,
        "n_images": args.n_images,
        "source_px": args.source_size,
        "stored_px": args.image_size,
        "clip_px": bundle.image_size,
        "batch": args.batch_size,
        "workers": args.workers,
    }
    rows.append({**base, **common, "path": "encoder_only", "images_per_s": round(enc, 1), "ratio": 1.0})
    rows.append(
        {**base, **common, "path": "end_to_end", "images_per_s": round(e2e, 1), "ratio": round(e2e / enc, 3)}
    )
    for name, speed in in_child.items():
        workers = 0 if name == "inline" else args.workers
        row = {"path": f"child_{name}", "workers": workers, "images_per_s": round(speed, 1)}
        rows.append({**base, **common, **row, "ratio": round(speed / enc, 3)})
    path = append_rows("embed", rows)
    print_table(
        rows,
        [
            "device",
            "model",
            "path",
            "n_images",
            "stored_px",
            "clip_px",
            "batch",
            "workers",
            "images_per_s",
            "ratio",
        ],
    )
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
