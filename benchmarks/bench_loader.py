"""Benchmark the trainers' loader memory as the cache grows: the stored sample set, read per row
(trainers/data/sample_store.py) against loading every feature into memory, at 1M, 4M and 10M rows.

For each size it writes a features-only cache (embed sidecars of random unit D-dim float16 features
through feature_cache/writer.py: no images, so the image side of the loader, a pread per sample from the
tars, is not part of it), then runs, each in a fresh process so the memory figures are its own:

    everything   the feature side of the loader before the store: every embed sidecar read and checked
                 (feature_cache.committed.read_parquet_committed) and decoded into one float16 [N, D] array,
                 the keys as Python strings, the sample set's own copy of the conditions
    derive       the first loader of a store: the same reads, then the store written (seconds only)
    store        every later loader: trainers.data.sample_store.open_store, one pread per row

and reports start-up seconds (to the first batch), resident memory after start-up and after the batches
(VmRSS; RssAnon is the part that is not file pages the kernel can drop), the peak (VmHWM), and batches/s
of B samples through trainers.data.stream.CacheDataset's own sample stream (epoch permutation, conditions and
keys of the batch; the perturb condition: the image features themselves). Target: the store's resident
memory flat within 20% from 1M to 10M rows, and its start-up under 10 s at 10M.

    python benchmarks/bench_loader.py                        # 1M, 4M, 10M rows, D 512 (~30 GB of disk)
    python benchmarks/bench_loader.py --rows 100000,400000 --dim 64 --no-csv

`--figure latents` measures the latent cache (`trainers vae --encode`, read by `trainers ldm`) the same
way: a cache of embed sidecars (D 8) and a latents shard per embed shard (float32 `--latent-shape`,
written and committed as `--encode` does, by a stand-in VAE file), then, each in a fresh process:

    everything   the read before the store: trainers.data.derived.read_derived into one float32 array,
                 and a dict key -> row (KeyedRows)
    derive       the first load: trainers.data.derived_store.load_derived deriving the store, then opening it
    store        every later load: load_derived opening the store (a pread per key block and per latent)

with batches/s of B random keys looked up (`lookup`, as `trainers ldm` does per step). Raw rows go to
benchmarks/results/loader_latents.csv.

    python benchmarks/bench_loader.py --figure latents --rows 1000000,4000000,10000000   # ~6 GB of disk
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, print_table, stamp  # noqa: E402

SHARD_ROWS = 250_000


def build_cache(cache: Path, rows: int, dim: int) -> None:
    import numpy as np

    from feature_cache.writer import CacheWriter

    writer, rng = CacheWriter(cache, dim), np.random.default_rng(0)
    for shard, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        feats = rng.standard_normal((n, dim), dtype=np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        writer.embed(shard, [f"{i:010d}" for i in range(start, start + n)], feats.astype(np.float16))


def build_latents(cache: Path, rows: int, shape: tuple[int, ...]) -> Path:
    """Embed sidecars of `rows` keys (D 8) and their latents shards, committed as `trainers vae --encode`
    would for a stand-in VAE checkpoint (a file of random bytes: the cache is keyed on its digest)."""
    import numpy as np

    from feature_cache.layout import shard_file
    from feature_cache.writer import CacheWriter
    from manifests import Dep, ShardSpec, commit_manifest, list_manifests, stat_out, write_parquet_atomic
    from trainers.autoencoders.vae.encode import CODEC, KIND
    from trainers.data.derived import model_digest

    cache.mkdir(parents=True)
    checkpoint = cache.parent / f"{cache.name}-vae.pt"
    checkpoint.write_bytes(np.random.default_rng(1).bytes(4096))
    digest, stage = model_digest(checkpoint), KIND.stage(model_digest(checkpoint))
    writer, rng, dim = CacheWriter(cache, 8), np.random.default_rng(0), int(np.prod(shape))
    for shard, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        keys = [f"{i:010d}" for i in range(start, start + n)]
        writer.embed(shard, keys, rng.standard_normal((n, 8), dtype=np.float32).astype(np.float16))
        latents = rng.standard_normal((n, dim), dtype=np.float32)
        rel = shard_file(stage, shard)
        size, out_digest = write_parquet_atomic(cache / rel, CODEC.table(keys, latents, shape))
        deps = [Dep(o["path"], o["digest"]) for o in list_manifests(cache, "embed")[shard]["outs"]]
        spec = ShardSpec(stage, shard, KIND.version, {KIND.digest_param: digest, **dict(KIND.params)}, deps)
        extra = {"rows": n, KIND.shape_field: list(shape), "vae_id": digest[:12]}
        commit_manifest(cache, spec, [stat_out(cache, rel, size, out_digest, rows=n)], {}, extra=extra)
    return checkpoint


def latents_child(mode: str, cache: Path, rows: int, batch: int, batches: int) -> dict:
    """One figure of the latent cache: start-up to the first looked-up batch, memory, batches/s."""
    import numpy as np

    from trainers.autoencoders.vae.encode import KIND
    from trainers.data.derived import read_derived
    from trainers.data.derived_store import load_derived

    checkpoint = cache.parent / f"{cache.name}-vae.pt"
    rng = np.random.default_rng(0)
    base = memory()  # the interpreter, numpy, pyarrow and torch (trainers.autoencoders.vae.encode imports it)
    t0 = time.perf_counter()
    latents = (read_derived if mode == "everything" else load_derived)(KIND, cache, checkpoint)

    def one(step: int) -> None:
        found, values = latents.lookup([f"{i:010d}" for i in rng.integers(0, rows, batch).tolist()])
        assert found.all() and values.dtype == np.float32  # [B, C, h, w]

    figure = time_batches(one, t0, batches)
    return {"held": type(latents).__name__, "rss_base_mib": base["VmRSS"], **figure}


def time_batches(one, t0: float, batches: int) -> dict:
    """The figure of a loader opened at `t0`: start-up to its first batch `one(0)`, memory then, and
    batches/s and memory over `one(1..batches)`."""
    one(0)
    startup = time.perf_counter() - t0
    after_start = memory()
    t1 = time.perf_counter()
    for step in range(1, batches + 1):
        one(step)
    rate = batches / (time.perf_counter() - t1)
    after = memory()
    return {
        "startup_s": round(startup, 2),
        "rss_start_mib": after_start["VmRSS"],
        "anon_start_mib": after_start["RssAnon"],
        "rss_mib": after["VmRSS"],
        "anon_mib": after["RssAnon"],
        "peak_mib": after["VmHWM"],
        "batches_per_s": round(rate, 1),
    }


def memory() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "VmHWM"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)  # MiB
    return fields


def read_everything(cache: Path, dim: int):
    """(float16 [N, D], keys) the way the loader read them before the store."""
    import numpy as np

    from feature_cache.committed import read_parquet_committed
    from feature_cache.features import fixed_rows
    from feature_cache.layout import shard_out
    from manifests import list_manifests

    feats, keys = [], []
    for _, manifest in sorted(list_manifests(cache, "embed").items()):
        table = read_parquet_committed(cache, shard_out(manifest, ".parquet"), ["key", "img_emb"])
        feats.append(fixed_rows(table["img_emb"], dim, np.float16, "nan")[0])
        keys += table["key"].to_pylist()
    return np.concatenate(feats), keys


def child(mode: str, cache: Path, dim: int, batch: int, batches: int) -> dict:
    import numpy as np

    from trainers.data.sample_store import open_store, save_store, store_dir
    from trainers.data.stream import CacheDataset

    folder = store_dir(cache, "bench")
    t0 = time.perf_counter()
    if mode == "store":
        _, rows, arrays = open_store(cache, folder)
        cond, keys = arrays["cond"], rows.keys
    else:
        img_emb, key_list = read_everything(cache, dim)
        n = len(key_list)
        if mode == "derive":
            record = {"info": {}, "probability": 0.0, "tar_outs": {}, "parquet_outs": {}, "shards": []}
            clip = {"clip_model": "synthetic", "clip_pretrained": "", "identity": {}, "dim": dim}
            record.update(image_size=0, read_outs=[], clip=clip)
            where = np.zeros((n, 3), np.int64)
            save_store(folder, {"cond": img_emb, "pool": np.zeros(n, bool), "where": where}, key_list, record)
            return {"startup_s": round(time.perf_counter() - t0, 2)}
        cond, keys = img_emb[np.arange(n)].astype(np.float16), key_list  # the sample set's own copy
    n = len(cond)
    dataset = CacheDataset(
        None,
        np.arange(0),
        cond,
        seed=0,
        perturb_xi=None,
        paired_feat=None,
        paired_pool=np.zeros(0, bool),
        paired_probability=0.0,
    )
    dataset.rows_idx = range(n)  # only its length is read by the sample stream

    def one(step: int) -> None:
        samples, _, _ = dataset.samples(list(range(step * batch, (step + 1) * batch)))
        x = np.asarray(cond[samples], np.float32)  # [B, D]
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        [keys[int(i)] for i in samples]

    return time_batches(one, t0, batches)


def run_child(mode: str, cache: Path, args, rows: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--cache", str(cache), "--dim", str(args.dim)]
    cmd += ["--batch", str(args.batch), "--batches", str(args.batches), "--figure", args.figure]
    cmd += ["--rows", str(rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1000000,4000000,10000000", help="comma-separated cache sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument(
        "--skip-everything-above",
        type=int,
        default=4_000_000,
        help="rows above which the load-everything baseline is not run (it needs ~2x the features in memory)",
    )
    parser.add_argument("--figure", choices=["features", "latents"], default="features")
    parser.add_argument("--latent-shape", default="4,4,4", help="C,h,w of the latents (--figure latents)")
    parser.add_argument("--dir", default=None, help="where the caches are written (default: a temp dir)")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    latents = args.figure == "latents"
    shape = tuple(int(x) for x in args.latent_shape.split(","))
    if args.child:
        if latents:
            result = latents_child(args.child, Path(args.cache), int(args.rows), args.batch, args.batches)
        else:
            result = child(args.child, Path(args.cache), args.dim, args.batch, args.batches)
        print(json.dumps(result))
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-loader-"))
    rows_out = []
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            cache = root / f"cache-{rows}"
            t = time.perf_counter()
            build_latents(cache, rows, shape) if latents else build_cache(cache, rows, args.dim)
            print(f"{rows:,} rows: cache written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            modes = ["derive", "store"] + (["everything"] if rows <= args.skip_everything_above else [])
            for mode in modes:
                result = run_child(mode, cache, args, rows)
                size = {"latent_shape": "x".join(map(str, shape))} if latents else {"dim": args.dim}
                rows_out.append(
                    {**stamp("cpu"), "rows": rows, **size, "batch": args.batch, "loader": mode, **result}
                )
                print(rows_out[-1], file=sys.stderr)
            shutil.rmtree(cache)
            (root / f"cache-{rows}-vae.pt").unlink(missing_ok=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if not args.no_csv:
        append_rows("loader_latents" if latents else "loader", rows_out)
    columns = [
        "rows",
        "loader",
        *(["held"] if latents else []),
        "startup_s",
        *(["rss_base_mib"] if latents else []),
        "rss_start_mib",
        "rss_mib",
        "anon_mib",
        "peak_mib",
        "batches_per_s",
    ]
    print_table(rows_out, columns)


if __name__ == "__main__":
    main()
