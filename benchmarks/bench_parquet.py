"""Benchmark how the cache's Parquet files are written: `manifests.write_parquet_atomic` against the
previous writer settings (zstd with pyarrow's default dictionary encoding on every column), in one run.

The table is a stage output of N rows: a string key plus a float16 fixed-size list of D features
(the shape of embed sidecars, caption shards and optimize outputs), random unit vectors (real CLIP
features do not compress much either). Reported per writer: write and read seconds (median of --reps,
files on --dir), file size, and MB/s of feature bytes read. The current writer's time includes its
atomic commit (temp file, blake2b digest of every byte, fsync, rename), which the baseline skips.
Rows go to benchmarks/results/parquet.csv.

    python benchmarks/bench_parquet.py                      # N = 100,000, D = 512
    python benchmarks/bench_parquet.py --n 1000000 --dir /local/nvme
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import append_rows, print_table, stamp  # noqa: E402

from manifests import write_parquet_atomic  # noqa: E402

TABLE_COLUMNS = ["writer", "n", "d", "write_s", "read_s", "size_mb", "read_mb_per_s"]


def feature_table(n: int, dim: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return pa.table(
        {
            "key": pa.array([f"{i:09d}" for i in range(n)], pa.string()),
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).reshape(-1)), dim),
        }
    )


def write_previous(path: Path, table: pa.Table) -> None:
    """The baseline: what write_parquet_atomic did before (zstd, dictionary on by default)."""
    pq.write_table(table, path, compression="zstd")


def write_current(path: Path, table: pa.Table) -> None:
    write_parquet_atomic(path, table)


def measure(write, table: pa.Table, folder: Path, reps: int) -> dict[str, float]:
    path = folder / "bench.parquet"
    writes, reads = [], []
    for _ in range(reps):
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        write(path, table)
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        back = pq.read_table(path)
        reads.append(time.perf_counter() - start)
    assert back.equals(table), "the written file does not read back as the table"
    size = path.stat().st_size
    path.unlink()
    feature_bytes = table.num_rows * table.schema.field("emb").type.list_size * 2
    read_s = statistics.median(reads)
    return {
        "write_s": statistics.median(writes),
        "read_s": read_s,
        "size_mb": size / 1e6,
        "read_mb_per_s": feature_bytes / 1e6 / read_s,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="rows")
    p.add_argument("--dim", type=int, default=512, help="features per row (float16)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", type=Path, help="where to write the files (default: a temp dir)")
    args = p.parse_args(argv)
    if min(args.n, args.dim, args.reps) < 1:
        p.error("--n, --dim and --reps must be >= 1")
    table = feature_table(args.n, args.dim)
    base = stamp("cpu")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, write in (
            ("previous: zstd + dictionary", write_previous),
            ("write_parquet_atomic", write_current),
        ):
            result = measure(write, table, Path(tmp), args.reps)
            rows.append(
                {
                    **base,
                    "writer": name,
                    "n": args.n,
                    "d": args.dim,
                    **{k: f"{v:.4g}" for k, v in result.items()},
                }
            )
            print(f"  {name:<28} write {result['write_s']:.2f} s  read {result['read_s']:.2f} s", flush=True)
    print()
    print_table(rows, TABLE_COLUMNS)
    old, new = (float(r["read_s"]) for r in rows)
    old_w, new_w = (float(r["write_s"]) for r in rows)
    print(
        f"\nwrite_parquet_atomic vs previous: read {old / new:.2f}x faster, write {old_w / new_w:.2f}x faster"
    )
    print(f"rows appended to {append_rows('parquet', rows)}")


if __name__ == "__main__":
    main()
