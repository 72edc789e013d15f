"""The one shard runner (pipeline.stage.run_shards) takes a new stage as it is: a toy stage that plans
against its manifests and makes one shard per task is run, counted, cleaned up after a killed run, and
skipped when up to date, with nothing stage-specific in the runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from manifests import ShardSpec, check_shard, commit_manifest, list_manifests, stat_out, write_parquet_atomic
from manifests.atomic import TEMP_MARKER
from pipeline.layout import shard_file
from pipeline.stage import run_shards

STAGE = "toy"


@dataclass(frozen=True)
class ToyTask:
    cache: Path
    spec: ShardSpec
    values: tuple[int, ...]


def plan(cache: Path, shards: dict[int, tuple[int, ...]]) -> list[ToyTask]:
    specs = {shard: ShardSpec(STAGE, shard, "1", {"double": True}, [], {}) for shard in shards}
    return [ToyTask(cache, spec, shards[s]) for s, spec in specs.items() if check_shard(cache, spec)]


def make_toy_shard(task: ToyTask, progress=None) -> dict:
    """Doubles its values; a negative one is bad input, dropped and counted."""
    kept = [v for v in task.values if v >= 0]
    dropped = len(task.values) - len(kept)
    rel = shard_file(STAGE, task.spec.shard)
    size, digest = write_parquet_atomic(task.cache / rel, pa.table({"doubled": [2 * v for v in kept]}))
    outs = [stat_out(task.cache, rel, size, digest, len(kept))]
    if progress is not None:
        progress(len(task.values), ["negative"] * dropped)
    return commit_manifest(
        task.cache, task.spec, outs, {}, extra={"rows": len(kept), "dropped": {"negative": dropped}}
    )


class Bar:
    total, done = None, 0

    def set_total(self, total: int) -> None:
        self.total = total

    def __call__(self, n: int, reasons: list[str]) -> None:
        self.done += n


def test_a_toy_stage_runs_through_the_one_runner(tmp_path):
    shards = {0: (1, 2, 3), 1: (4, -1, 5)}
    (tmp_path / STAGE).mkdir()
    stray = tmp_path / STAGE / f".00001.parquet{TEMP_MARKER}dead"
    stray.write_bytes(b"left by a killed run")
    bar = Bar()
    run = run_shards(tmp_path, STAGE, plan(tmp_path, shards), make_toy_shard, progress=bar, total=lambda: 6)
    assert run.shards_run == [0, 1] and run.rows == 5 and run.dropped == {"negative": 1}
    assert bar.total == 6 and bar.done == 6 and not stray.exists()
    assert sorted(list_manifests(tmp_path, STAGE)) == [0, 1]

    again = run_shards(tmp_path, STAGE, plan(tmp_path, shards), make_toy_shard)
    assert again.shards_run == [] and again.rows == 0  # up to date: nothing is made

    added = run_shards(tmp_path, STAGE, plan(tmp_path, {**shards, 2: (7,)}), make_toy_shard)
    assert added.shards_run == [2] and added.rows == 1
