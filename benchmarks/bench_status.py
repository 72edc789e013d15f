"""Benchmark `pipeline status` and a no-op `pipeline run` on a cache of many shards.

Builds a project whose embed and optimize stages (method perturb) have N committed shards: one tiny
input tar per shard, manifests with the real fingerprint keys, and small output files. Then times, as
subprocesses (Python start-up and imports included), `pipeline status` and `pipeline run`, which must
find nothing to do. The baseline in the same run is the floor: reading every manifest JSON once.

Then `pipeline status` on a `cp -r` copy of that cache (new mtimes, same bytes): the first one hashes
every output once and remembers its stat, the second is as cheap as on the original.

Then the cost of `pipeline status --verify` (content digests) per GB of outputs, on a second cache of
`--verify-shards` shards holding `--verify-gb` in all, against the floor of hashing the same bytes
in-process; page cache warm (just written) and, where this process may drop it (root), cold.

    python benchmarks/bench_status.py --shards 10000 --verify-gb 1

Targets on a 2-core machine: status under 5 s, no-op run under 10 s at 10,000 shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, print_table, stamp  # noqa: E402

CLI = [sys.executable, "-c", "from cli.pipeline import main; main()"]
CONFIG = """
cache = "cache"
[embed]
inputs = ["inputs/*.tar"]
clip_model = "lafite-tiny"
clip_pretrained = ""
image_size = 32
[optimize]
method = "perturb"
"""


def build(root: Path, shards: int, payload: int = 0) -> None:
    """Inputs, plan and committed manifests for `shards` shards, made through the stages' own planners.

    Each of the three outputs per shard holds `payload` random bytes (default: its own name)."""
    from feature_cache.layout import shard_file
    from manifests import commit_manifest, digest_file_content, stat_out, write_bytes_atomic, write_stats
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.stage import plan_embed
    from pipeline.optimize.config import OptimizeConfig
    from pipeline.optimize.stage import plan_optimize

    (root / "inputs").mkdir(parents=True)
    for i in range(shards):
        (root / "inputs" / f"{i:05d}.tar").write_bytes(b"\0" * 1024)
    (root / "pipeline.toml").write_text(CONFIG)
    cache = root / "cache"
    embed = EmbedConfig(
        inputs=(str(root / "inputs" / "*.tar"),),
        cache=cache,
        clip_model="lafite-tiny",
        clip_pretrained="",
        image_size=32,
    )
    for task in plan_embed(embed).tasks:
        outs = []
        for ext in ("tar", "parquet"):
            rel = shard_file("embed", task.spec.shard, ext)
            size, digest = write_bytes_atomic(cache / rel, os.urandom(payload) if payload else rel.encode())
            outs.append(stat_out(cache, rel, size, digest, 1))
        write_stats(cache, "embed", task.spec.shard, {"written": 1, "dropped": {}})
        content = {u.id: digest_file_content(Path(u.path)) for u in task.units}  # what --verify compares
        extra = {"rows": 1, "dim": 64, "dropped": {}, "input_content": content}
        commit_manifest(cache, task.spec, outs, {}, extra=extra)
    for task in plan_optimize(OptimizeConfig(cache=cache, method="perturb")).tasks:
        rel = shard_file("optimize", task.spec.shard)
        size, digest = write_bytes_atomic(cache / rel, os.urandom(payload) if payload else rel.encode())
        commit_manifest(cache, task.spec, [stat_out(cache, rel, size, digest, 1)], {}, extra={"rows": 1})


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    return time.perf_counter() - t, proc.stdout


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only), so the next read comes from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def verify_rows(shards: int, gigabytes: float, cold: bool = True) -> list[dict]:
    """Seconds per GB of `status --verify` over plain `status`, and of hashing the bytes (the floor).

    `cold` also measures with the page cache dropped (machine-wide, so only where root allows it)."""
    from manifests import digest_file_content

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, shards, payload=int(gigabytes * 1e9 / (3 * shards)))
        outputs = [p for p in (root / "cache").rglob("*") if p.suffix in (".tar", ".parquet")]
        gb = sum(p.stat().st_size for p in outputs) / 1e9
        plain_s, _ = timed(["status"], root)
        rows = []
        for page_cache in ("warm", "cold") if cold else ("warm",):
            if page_cache == "cold" and not drop_page_cache():
                continue
            t = time.perf_counter()
            for p in outputs:
                digest_file_content(p)
            floor_s = time.perf_counter() - t
            if page_cache == "cold":
                drop_page_cache()
            verify_s, out = timed(["status", "--verify"], root)
            assert " 0 stale" in out.splitlines()[0], out
            base = {**stamp("cpu"), "shards": shards, "cores": os.cpu_count(), "gb": round(gb, 4)}
            rows += [
                {**base, "what": f"hash every output in-process, floor ({page_cache})",
                 "seconds": round(floor_s, 2), "s_per_gb": round(floor_s / gb, 2), "target_s": ""},
                {**base, "what": f"pipeline status --verify minus status ({page_cache})",
                 "seconds": round(verify_s - plain_s, 2), "s_per_gb": round((verify_s - plain_s) / gb, 2),
                 "target_s": ""},
            ]  # fmt: skip
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument(
        "--verify-gb", type=float, default=1.0, help="Outputs of the --verify cache (0: skip)."
    )
    parser.add_argument("--verify-shards", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        build(root, args.shards)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        for stage in ("embed", "optimize"):
            for p in (root / "cache" / stage / "_manifests").iterdir():
                json.loads(p.read_text())
        floor_s = time.perf_counter() - t
        status_s, status_out = timed(["status"], root)
        run_s, run_out = timed(["run"], root)
        assert " 0 stale" in status_out.splitlines()[0], status_out
        assert "0 shard(s) made" in run_out, run_out
        # A copy that does not keep mtimes (cp -r): the first status hashes each output once, then
        # remembers its new stat; the second is stat-only again.
        subprocess.run(["cp", "-r", str(root / "cache"), str(root / "copy")], check=True)
        copy_first_s, out = timed(["status", "--cache", "copy"], root)
        assert " 0 stale" in out.splitlines()[0], out
        copy_second_s, _ = timed(["status", "--cache", "copy"], root)
    base = {**stamp("cpu"), "shards": args.shards, "cores": os.cpu_count()}
    rows = [
        {**base, "what": "read every manifest (floor)", "seconds": round(floor_s, 2), "target_s": ""},
        {**base, "what": "pipeline status", "seconds": round(status_s, 2), "target_s": 5},
        {**base, "what": "pipeline run (no-op)", "seconds": round(run_s, 2), "target_s": 10},
        {
            **base,
            "what": "pipeline status, cp -r copy, first",
            "seconds": round(copy_first_s, 2),
            "target_s": "",
        },
        {
            **base,
            "what": "pipeline status, cp -r copy, second",
            "seconds": round(copy_second_s, 2),
            "target_s": 5,
        },
    ]
    if args.verify_gb > 0:
        rows += verify_rows(args.verify_shards, args.verify_gb)
    append_rows("status", rows)
    print(f"(built the {args.shards:,}-shard cache in {build_s:.1f} s)")
    print_table(rows, ["device", "shards", "what", "seconds", "s_per_gb", "target_s"])


if __name__ == "__main__":
    main()
