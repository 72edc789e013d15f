"""Benchmark what verifying a trainer's derived store costs (trainers/data/store_files.py): a stored sample
set (trainers/data/sample_store.py) of N rows of D-dim float16 conditions, written and opened with its digests
checked, against the same open without the check, in one run and one process.

    write            save_store: the store's files written, then hashed for info.json (the hashing
                     alone timed again after it: `of_which_hashing_s`)
    open unverified  open_store with the digest check left out (what a trainer did before), to the first
                     batch of B rows read (one pread a row)
    open verified    open_store as trainers run it: stamps unchanged, so a stat per file
    open copied      the store copied (new inodes and ctimes, same bytes, as after copying a cache): every
                     file hashed once, its stamps renewed in info.json
    open renewed     the next open after that: a stat per file again

Each open is timed `--repeat` times (median). The files are in the page cache throughout (just written),
so `open copied` is the hashing rate of the CPU, not of the disk.

    python benchmarks/bench_store_verify.py                      # 1M rows, D 512: a 1 GB cond.npy
    python benchmarks/bench_store_verify.py --rows 100000 --no-csv
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, print_table, stamp  # noqa: E402


def write_store(folder: Path, rows: int, dim: int) -> dict[str, float]:
    """A sample store of `rows` random unit features (no images: the where rows point nowhere)."""
    import numpy as np

    from trainers.data.sample_store import save_store
    from trainers.data.store_files import seal_files

    rng = np.random.default_rng(0)
    cond = rng.standard_normal((rows, dim), dtype=np.float32)
    cond = (cond / np.linalg.norm(cond, axis=1, keepdims=True)).astype(np.float16)
    clip = {"clip_model": "synthetic", "clip_pretrained": "", "identity": {}, "dim": dim}
    record = {"info": {}, "probability": 0.0, "tar_outs": {}, "parquet_outs": {}, "shards": []}
    record.update(image_size=0, read_outs=[], clip=clip)
    arrays = {"cond": cond, "pool": np.zeros(rows, bool), "where": np.zeros((rows, 3), np.int64)}
    t = time.perf_counter()
    save_store(folder, arrays, [f"{i:010d}" for i in range(rows)], record)
    total = time.perf_counter() - t
    t = time.perf_counter()  # the hashing part of it, again: the same files, as warm in the page cache
    seal_files(folder, [p.name for p in folder.glob("*.npy")])
    return {
        "write_s": total,
        "seal_s": time.perf_counter() - t,
        "bytes": sum(p.stat().st_size for p in folder.iterdir()),
    }


def open_and_read(folder: Path, batch: int, verified: bool = True) -> float:
    """Seconds to open the store and read one batch of `batch` rows spread over it."""
    import numpy as np

    from trainers.data import sample_store

    real = sample_store.check_sealed
    if not verified:
        sample_store.check_sealed = lambda folder, files: False
    try:
        t = time.perf_counter()
        opened = sample_store.open_store(folder.parent, folder)
        assert opened is not None, "the store did not open"
        _, rows, arrays = opened
        picks = np.linspace(0, len(rows) - 1, batch).astype(np.int64)
        cond = np.asarray(arrays["cond"][picks], np.float32)
        [rows.keys[int(i)] for i in picks]
        elapsed = time.perf_counter() - t
    finally:
        sample_store.check_sealed = real
    assert np.isfinite(cond).all()
    return elapsed


def median_of(repeat: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeat))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-store-verify-"))
    try:
        folder = root / "_trainers" / "samples-bench"
        written = write_store(folder, args.rows, args.dim)
        open_and_read(folder, args.batch)  # imports and first reads out of the figures
        figures = {
            "open unverified": median_of(args.repeat, lambda: open_and_read(folder, args.batch, False)),
            "open verified": median_of(args.repeat, lambda: open_and_read(folder, args.batch)),
        }
        copied = []
        for _ in range(args.repeat):
            copy = folder.with_name("samples-copy")
            shutil.copytree(folder, copy)
            shutil.rmtree(folder)
            copy.rename(folder)
            copied.append(open_and_read(folder, args.batch))
        figures["open copied"] = statistics.median(copied)
        figures["open renewed"] = median_of(args.repeat, lambda: open_and_read(folder, args.batch))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = {
        **stamp("cpu"),
        "rows": args.rows,
        "dim": args.dim,
        "batch": args.batch,
        "store_mb": round(written["bytes"] / 1e6),
    }
    out = [
        {
            **base,
            "step": "write",
            "seconds": round(written["write_s"], 4),
            "of_which_hashing_s": round(written["seal_s"], 4),
        }
    ]
    unverified = figures["open unverified"]
    out += [
        {**base, "step": step, "seconds": round(s, 4), "vs_unverified": f"{s / unverified:.2f}x"}
        for step, s in figures.items()
    ]
    if not args.no_csv:
        append_rows("store_verify", out)
    print_table(out, ["rows", "store_mb", "step", "seconds", "of_which_hashing_s", "vs_unverified"])


if __name__ == "__main__":
    main()
