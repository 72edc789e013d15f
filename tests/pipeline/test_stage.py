"""The one shard runner (feature_cache.runner.run_shards) takes a new stage as it is: a toy stage that plans
against its manifests and makes one shard per task is run, counted, cleaned up after a killed run, and
skipped when up to date, with nothing stage-specific in the runner."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from feature_cache.layout import shard_file
from feature_cache.runner import run_shards
from manifests import ShardSpec, check_shard, commit_manifest, list_manifests, stat_out, write_parquet_atomic
from manifests.atomic import TEMP_MARKER

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
    assert run.shards_run == [0, 1] and run.rows_written == 5 and run.dropped == {"negative": 1}
    assert bar.total == 6 and bar.done == 6 and not stray.exists()
    assert sorted(list_manifests(tmp_path, STAGE)) == [0, 1]

    again = run_shards(tmp_path, STAGE, plan(tmp_path, shards), make_toy_shard)
    assert again.shards_run == [] and again.rows_written == 0  # up to date: nothing is made

    added = run_shards(tmp_path, STAGE, plan(tmp_path, {**shards, 2: (7,)}), make_toy_shard)
    assert added.shards_run == [2] and added.rows_written == 1


# The same toy stage registered in pipeline/stages.py: this module implements the stage protocol
# (pipeline/engine/stage.py: NAME, configure, run_stage, report, and STATUS, its step's status function), and
# run, status, --until, --force and its pipeline.toml section take it with its step in feature_cache/steps.py
# and no other change.

NAME = STAGE


@dataclass(frozen=True)
class ToyConfig:
    cache: Path
    shards: dict[int, tuple[int, ...]]
    force: bool = False


def configure(sections: dict, cache: Path, *, force: bool, verify: bool, repair: bool) -> tuple:
    section = sections.get(STAGE, {})
    shards = {int(k): tuple(v) for k, v in section.get("shards", {}).items()}
    return (ToyConfig(cache, shards, force),) if shards else ()


def _tasks(config: ToyConfig) -> list[ToyTask]:
    if not config.force:
        return plan(config.cache, config.shards)
    specs = {s: ShardSpec(STAGE, s, "1", {"double": True}, [], {}) for s in config.shards}
    return [ToyTask(config.cache, spec, config.shards[s]) for s, spec in specs.items()]


def run_stage(config: ToyConfig, executor, progress_factory):
    with progress_factory(STAGE, total=None, unit="v") as advance:
        return run_shards(
            config.cache, STAGE, _tasks(config), make_toy_shard, executor=executor, progress=advance
        )


def report(result, config: ToyConfig) -> list[str]:
    return [f"toy: {len(result.shards_run)} shard(s) made, {result.rows_written} values"]


def toy_status(cache: Path, configs: tuple, upstream: dict):
    from pipeline.engine.step_status import StageStatus

    status = StageStatus(STAGE)
    for task in plan(cache, configs[0].shards) if configs else []:
        status.stale[task.spec.shard] = "new shard"
    status.up_to_date = sorted(set(configs[0].shards) - set(status.stale)) if configs else []
    return [status]


STATUS = {STAGE: toy_status}


def test_a_registered_toy_stage_is_configured_run_reported_and_judged(tmp_path, monkeypatch):
    from core.errors import ConfigError
    from feature_cache import steps
    from pipeline import stages
    from pipeline.engine.config import stage_sections
    from pipeline.engine.stage import Stage
    from pipeline.run import RunConfig, report_lines, run_pipeline, stage_configs
    from pipeline.status import pipeline_status

    toy = sys.modules[__name__]
    assert isinstance(toy, Stage)  # the protocol, checked
    monkeypatch.setattr(stages, "STAGES", (toy,))  # the registry line
    monkeypatch.setattr(
        steps, "STEPS", (steps.Step(STAGE, (), STAGE, "pipeline run --until toy --cache {cache}"),)
    )
    assert stage_sections() == ("toy", "run")
    sections = {STAGE: {"shards": {"0": [1, 2, 3], "1": [4, -1, 5]}}}
    configs = stage_configs(sections, tmp_path)
    (tmp_path / STAGE).mkdir()
    assert [s.to_dict()["stale"] for s in pipeline_status(tmp_path, configs)] == [
        {"0": "new shard", "1": "new shard"}
    ]

    results = run_pipeline(configs, RunConfig(tmp_path, until=STAGE))
    assert report_lines(configs, results) == ["toy: 2 shard(s) made, 5 values"]
    (status,) = pipeline_status(tmp_path, configs)
    assert status.up_to_date == [0, 1] and not status.stale
    again = run_pipeline(configs, RunConfig(tmp_path, until=STAGE))
    assert report_lines(configs, again) == ["toy: 0 shard(s) made, 0 values"]

    forced = stage_configs(sections, tmp_path, force=(STAGE,))
    assert report_lines(forced, run_pipeline(forced, RunConfig(tmp_path, force=(STAGE,), until=STAGE))) == [
        "toy: 2 shard(s) made, 5 values"
    ]
    with pytest.raises(ConfigError, match="--until must be one of toy"):
        RunConfig(tmp_path, until="optimize").validate()
