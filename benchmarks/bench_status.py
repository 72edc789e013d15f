"""Benchmark `pipeline status` and a no-op `pipeline run` on a cache of many shards.

Builds a project whose embed and optimize stages (method perturb) have N committed shards: one tiny
input tar per shard, manifests with the real fingerprint keys, and small output files. Then times, as
subprocesses (Python start-up and imports included), `pipeline status` and `pipeline run`, which must
find nothing to do. The baseline in the same run is the floor: reading every manifest JSON once.

    python benchmarks/bench_status.py --shards 10000

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

CLI = [sys.executable, "-c", "from pipeline.cli import main; main()"]
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


def build(root: Path, shards: int) -> None:
    """Inputs, plan and committed manifests for `shards` shards, made through the stages' own planners."""
    from manifests import commit_manifest, stat_out, write_bytes_atomic
    from pipeline.embed import EmbedConfig, plan_embed
    from pipeline.optimize import OptimizeConfig, plan_optimize

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
            rel = f"embed/{task.spec.shard:05d}.{ext}"
            size, digest = write_bytes_atomic(cache / rel, f"{rel}".encode())
            outs.append(stat_out(cache, rel, size, digest, 1))
        write_bytes_atomic(
            cache / "embed" / f"{task.spec.shard:05d}.stats.json", b'{"written": 1, "dropped": {}}'
        )
        commit_manifest(cache, task.spec, outs, {}, extra={"rows": 1, "dim": 64, "dropped": {}})
    for task in plan_optimize(OptimizeConfig(cache=cache, method="perturb")).tasks:
        rel = f"optimize/{task.spec.shard:05d}.parquet"
        size, digest = write_bytes_atomic(cache / rel, rel.encode())
        commit_manifest(cache, task.spec, [stat_out(cache, rel, size, digest, 1)], {}, extra={"rows": 1})


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    return time.perf_counter() - t, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=10_000)
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
    base = {**stamp("cpu"), "shards": args.shards, "cores": os.cpu_count()}
    rows = [
        {**base, "what": "read every manifest (floor)", "seconds": round(floor_s, 2), "target_s": ""},
        {**base, "what": "pipeline status", "seconds": round(status_s, 2), "target_s": 5},
        {**base, "what": "pipeline run (no-op)", "seconds": round(run_s, 2), "target_s": 10},
    ]
    append_rows("status", rows)
    print(f"(built the {args.shards:,}-shard cache in {build_s:.1f} s)")
    print_table(rows, ["device", "shards", "what", "seconds", "target_s"])


if __name__ == "__main__":
    main()
