"""Benchmark `pipeline optimize`: images/s of the whole stage, and of its core on data in memory.

Two modes, both by default, each timing the `retrieve` method (no refinement) as the baseline in the
same run:

    stage   `run_optimize` on a cache of N images in shards of --shard-size, written beforehand by
            `feature_cache.writer.CacheWriter` (embed sidecars, one caption shard, retrieve shards,
            manifests): planning, reading Parquet, the caption bank, the maths, the stats and writing
            optimize/*.parquet with manifests. This is the figure the 1M images/min target is about.
    core    `pseudo_txt_features` on tensors already on the device, as below.

What the core mode times, per N: the seeded shuffle into batches, the gather of the k neighbour caption
features, the retrieve mix h0, `--steps` Adam steps on the contrastive objective per batch (method
optimize), the before/after loss and in-batch top-1 figures the stage reports, and copying the float16
result to the host. Not timed: reading and writing Parquet, and making the data. In the same run the
`retrieve` method (no refinement) is timed on the same data as the baseline, so `vs_retrieve` is the cost
of refining.

Data: `--clusters` centres in D dimensions; image features normalize(c + noise); a caption bank of
`--captions` features normalize(c + noise + gap); each image's k neighbours are captions of its own
cluster (like a retrieval hit), with their true similarities.

Rows go to benchmarks/results/optimize.csv (date, commit, device, backend, precision, method, param, n,
d, k, steps, batch_size, seconds, images_per_s, mode). `--precision auto` is what the stage does: bf16
loss-kernel inputs on CUDA, fp32 on CPU. The target from the issue: at least 1M images per minute (16,667
images/s) at 20 steps on one H100.

    python benchmarks/bench_optimize.py                                    # CUDA: N = 65536 .. 1048576
    python benchmarks/bench_optimize.py --device cpu --n 8192 --batch-size 4096 --shard-size 4096
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_rows, print_table, stamp  # noqa: E402

from methods.common import Hyper, Neighbours, split_batches  # noqa: E402
from methods.run import pseudo_txt_features

TARGET_IMAGES_PER_S = 1_000_000 / 60
TABLE_COLUMNS = [
    "mode",
    "backend",
    "precision",
    "method",
    "n",
    "d",
    "k",
    "steps",
    "batch_size",
    "seconds",
    "images_per_s",
]


def make_data(n: int, dim: int, k: int, n_captions: int, clusters: int, device: torch.device, seed: int = 0):
    """Structured features on `device`: (f [n, D] fp32, Neighbours with a float16 bank)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def unit_noise(rows: int) -> torch.Tensor:
        return F.normalize(torch.randn(rows, dim, device=device, generator=g), dim=1)

    centres = F.normalize(torch.randn(clusters, dim, device=device, generator=g), dim=1)
    gap = F.normalize(torch.randn(1, dim, device=device, generator=g), dim=1)
    cap_cluster = torch.arange(n_captions, device=device) % clusters  # caption j belongs to cluster j % C
    bank = F.normalize(centres[cap_cluster] + unit_noise(n_captions) + gap, dim=1).half()
    img_cluster = torch.randint(clusters, (n,), device=device, generator=g)
    f = torch.empty(n, dim, device=device)
    for s in range(0, n, 65_536):  # chunks: the temporaries stay small at N = 1M
        c = img_cluster[s : s + 65_536]
        f[s : s + 65_536] = F.normalize(centres[c] + unit_noise(len(c)), dim=1)
    per_cluster = n_captions // clusters
    pick = torch.randint(per_cluster, (n, k), device=device, generator=g)
    rows = img_cluster[:, None] + clusters * pick  # [n, k]: captions of the image's own cluster
    sims = torch.empty(n, k, device=device)
    for s in range(0, n, 65_536):
        sims[s : s + 65_536] = torch.einsum(
            "nd,nkd->nk", f[s : s + 65_536], bank[rows[s : s + 65_536]].float()
        )
    sims, order = sims.sort(dim=1, descending=True)  # retrieval returns neighbours best first
    rows = rows.gather(1, order)
    return f, Neighbours(bank, rows, sims, torch.ones_like(sims, dtype=torch.bool))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_core(f, nbrs, hp: Hyper, batch_size: int, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    batches = split_batches(f.shape[0], batch_size, np.random.default_rng([0, 0, 1]))
    feats = pseudo_txt_features(f, hp, batches, nbrs=nbrs)
    feats.h_final.to(torch.float16).cpu()
    sync(device)
    return time.perf_counter() - start, feats


def build_cache(root: Path, f: torch.Tensor, nbrs: Neighbours, shard_size: int) -> Path:
    """The same data as a cache: embed and retrieve shards of `shard_size` images, one caption shard
    (caption id = bank row), each committed with its manifest."""
    from feature_cache.writer import CacheWriter

    writer = CacheWriter(root, f.shape[1])
    bank = nbrs.bank.float().cpu().numpy()
    writer.captions(0, np.arange(len(bank)), [f"caption {j}" for j in range(len(bank))], bank)
    for shard, start in enumerate(range(0, f.shape[0], shard_size)):
        stop = min(start + shard_size, f.shape[0])
        keys = [f"{i:09d}" for i in range(start, stop)]
        writer.embed(shard, keys, f[start:stop].cpu().numpy())
        writer.retrieve(shard, keys, nbrs.rows[start:stop].cpu().numpy(), nbrs.sims[start:stop].cpu().numpy())
    return root


def stage_cache_root(parent: Path | None, n: int) -> Path:
    """A fresh folder for the N-image cache: a temp dir, or PARENT/bench-optimize-N (kept afterwards;
    refused if it exists, so nothing of the user's is overwritten)."""
    if parent is None:
        return Path(tempfile.mkdtemp(prefix="bench-optimize-"))
    root = parent / f"bench-optimize-{n}"
    if root.exists():
        raise SystemExit(f"--cache-dir: {root} exists; remove it or choose another --cache-dir")
    return root


def time_stage(cache: Path, method: str, backend: str, precision: str, args, device: torch.device):
    """Seconds of `run_optimize` remaking every shard, the caption bank loaded afresh; and its result."""
    from feature_cache import caption_bank
    from pipeline.optimize.config import OptimizeConfig
    from pipeline.optimize.stage import run_optimize

    config = OptimizeConfig(
        cache=cache,
        method=method,
        param=args.param,
        steps=args.steps,
        batch_size=args.batch_size,
        backend=backend,
        precision=precision,
        device=str(device),
        force=True,
    )
    caption_bank._BANKS.clear()
    sync(device)
    start = time.perf_counter()
    result = run_optimize(config)
    sync(device)
    return time.perf_counter() - start, result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="65536,262144,1048576", help="comma-separated image counts")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch-size", type=int, default=65_536, help="images per contrastive batch")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=16, help="neighbours per image")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--param", default="weights", choices=["weights", "residual"])
    p.add_argument("--captions", type=int, default=100_000, help="caption bank size")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--backends", default="", help="comma-separated; default torch, plus triton on CUDA")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="loss-kernel inputs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--modes", default="stage,core", help="comma-separated: stage (whole stage), core")
    p.add_argument("--shard-size", type=int, default=65_536, help="stage mode: images per shard")
    p.add_argument(
        "--cache-dir", type=Path, help="stage mode: where to build the cache (default: a temp dir)"
    )
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"stage", "core"}:
        p.error(f"--modes: choose from stage, core; got {args.modes}")
    if args.shard_size < 1 or args.batch_size < 1:
        p.error("--shard-size and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b] or (
        ["torch", "triton"] if device.type == "cuda" else ["torch"]
    )
    if device.type != "cuda" and "triton" in backends:
        raise SystemExit("the triton backend needs a CUDA device")
    sizes = sorted(int(s) for s in args.n.split(",") if s.strip())
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    loss_dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]  # as `pipeline optimize --precision`
    base = stamp(args.device)
    print(
        f"device: {base['device']}  D={args.dim}  k={args.k}  steps={args.steps}  param={args.param}  "
        f"batch={args.batch_size}  captions={args.captions}  precision={precision}  N={sizes}\n"
    )
    rows: list[dict] = []
    for n in sizes:
        f, nbrs = make_data(n, args.dim, args.k, args.captions, args.clusters, device)
        runs = [("retrieve", "torch")] + [("optimize", b) for b in backends]
        if n == sizes[0]:  # warm-up on a slice: triton compilation, cuBLAS heuristics, allocator
            for method, backend in runs:
                m = min(n, 2 * min(args.batch_size, n))
                warm = Neighbours(nbrs.bank, nbrs.rows[:m], nbrs.sims[:m], nbrs.valid[:m])
                warm_hp = Hyper(method=method, steps=1, backend=backend, loss_dtype=loss_dtype)
                time_core(f[:m], warm, warm_hp, args.batch_size, device)
        for mode in args.modes:
            root = None
            if mode == "stage":
                root = stage_cache_root(args.cache_dir, n)
                build_start = time.perf_counter()
                build_cache(root, f, nbrs, args.shard_size)
                print(f"  cache of {n:,} images built in {time.perf_counter() - build_start:.1f} s at {root}")
            for method, backend in runs:
                if mode == "stage":
                    seconds, result = time_stage(root, method, backend, precision, args, device)
                    summary = result.summary
                    detail = f"top-1 {summary.get('top1_init')} -> {summary.get('top1_final')}"
                    batch = min(args.batch_size, args.shard_size, n)
                else:
                    hp = Hyper(
                        method=method,
                        param=args.param,
                        steps=args.steps,
                        backend=backend,
                        loss_dtype=loss_dtype,
                    )
                    seconds, feats = time_core(f, nbrs, hp, args.batch_size, device)
                    detail = f"top-1 {feats.top1_init:.3f} -> {feats.top1_final:.3f}"
                    batch = min(args.batch_size, n)
                rows.append(
                    {
                        **base,
                        "mode": mode,
                        "backend": backend,
                        "precision": precision,
                        "method": method,
                        "param": args.param if method == "optimize" else "",
                        "n": n,
                        "d": args.dim,
                        "k": args.k,
                        "steps": args.steps if method == "optimize" else 0,
                        "batch_size": batch,
                        "seconds": f"{seconds:.3f}",
                        "images_per_s": f"{n / seconds:.1f}",
                    }
                )
                rate = f"{seconds:8.2f} s  {n / seconds:10.1f} img/s"
                print(f"  {mode:<5} {method:<8} {backend:<6} N={n:<8} {rate}  {detail}", flush=True)
            if root is not None and args.cache_dir is None:
                shutil.rmtree(root, ignore_errors=True)
        del f, nbrs
    print()
    print_table(rows, TABLE_COLUMNS)
    by = {(r["mode"], r["method"], r["backend"], r["n"]): float(r["images_per_s"]) for r in rows}
    print("\noptimize vs retrieve (same run) and vs the 1M images/min target (meant for one H100):")
    for (mode, method, backend, n), rate in by.items():
        if method == "optimize":
            baseline = by[(mode, "retrieve", "torch", n)]
            print(
                f"  {mode:<5} {backend:<6} N={n:<8} {rate / baseline:6.3f}x retrieve, "
                f"{rate / TARGET_IMAGES_PER_S:6.3f}x target"
            )
    path = append_rows("optimize", rows)
    print(f"\nrows appended to {path}")


if __name__ == "__main__":
    main()
