"""`pipeline run`: embed, retrieve, optimize in order, each only on its stale shards.

Each stage plans against what its upstream has committed *after* the upstream ran, so staleness
propagates by digests: a remade embed shard with new bytes stales its retrieve and optimize shards, and
one that came out byte-identical stops the cascade, which the downstream stages' lines then name
(`upstream_identical`). The whole run holds the cache lock. What the run prints is each stage's own
`report`, the same lines as the stage's command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from feature_cache.steps import stage_names, step


@dataclass(frozen=True)
class RunConfig:
    cache: Path = Path("cache")  # the feature cache
    until: str = "optimize"  # last stage to run
    force: tuple[str, ...] = ()  # stages whose every shard is remade
    executor: str = "local"  # local | dask
    scheduler: str | None = None  # Dask scheduler address (or DASK_SCHEDULER_ADDRESS); none: a LocalCluster
    workers: int | None = None  # LocalCluster worker processes
    wait: float = 0.0  # seconds to wait for another run's lock before giving up
    verify: bool = False  # re-hash every input and output instead of trusting size + mtime; remake damage

    def validate(self) -> None:
        names = stage_names()
        if self.until not in names:
            raise ConfigError(f"--until must be one of {', '.join(names)}")
        for name in self.force:
            if name not in names:
                raise ConfigError(f"--force {name}: not a stage (stages: {', '.join(names)})")
        if self.executor not in ("local", "dask"):
            raise ConfigError("--executor must be local or dask")

    def stages(self) -> tuple[str, ...]:
        names = stage_names()
        return names[: names.index(self.until) + 1]


@dataclass
class StageConfigs:
    """Each stage's configs, by stage name, from pipeline.toml: () for a stage not configured (retrieve
    without a caption corpus), several for optimize (the default, then each [optimize.variants.NAME])."""

    by_stage: dict[str, tuple]

    def of(self, stage: str) -> tuple:
        return self.by_stage.get(stage, ())


def stage_configs(
    sections: dict[str, dict],
    cache: Path,
    force: tuple[str, ...] = (),
    *,
    verify: bool = False,
    repair: bool = False,
) -> StageConfigs:
    """Every stage's configs from the pipeline.toml sections (each stage module's `configure`), with one
    cache for all. `verify` and `repair` are the run's: embed re-hashes its inputs, and rebuilds a damaged
    shard plan."""
    from pipeline import stages  # the stage modules: numpy, not for `--help`

    return StageConfigs(
        {
            stage.NAME: tuple(
                stage.configure(sections, cache, force=stage.NAME in force, verify=verify, repair=repair)
            )
            for stage in stages.STAGES
        }
    )


def run_pipeline(configs: StageConfigs, run: RunConfig, progress_factory=None) -> dict[str, Any]:
    """Run the stages in order under the cache lock; returns each config's result by its stage directory
    (`optimize-mix` for a variant)."""
    from core.progress import null_progress
    from feature_cache.executor import make_executor
    from manifests import verifying_outputs
    from manifests.lock import CacheLock
    from pipeline import stages  # the stage modules: numpy, not for `--help`

    run.validate()
    if "embed" in run.stages():  # a first run that cannot load its CLIP leaves no cache behind
        from pipeline.embed.stage import check_first_run

        for config in configs.of("embed"):
            check_first_run(config)
    results: dict[str, Any] = {}
    with CacheLock(run.cache, wait=run.wait), verifying_outputs(run.verify):
        executor = make_executor(run.executor, run.scheduler, run.workers)
        try:
            for name in run.stages():
                module = stages.stage(name)
                for config in configs.of(name):
                    key = result_key(name, config)
                    results[key] = module.run_stage(config, executor, progress_factory or null_progress)
                    note_identical_upstream(key, results)
        finally:
            executor.close()
    return results


def note_identical_upstream(key: str, results: dict[str, Any]) -> None:
    """Name, on the result filed under `key`, the upstream shards this run remade with the same data outputs
    that its up-to-date shards read (so they were not redone): what would otherwise look like a silent skip.
    """
    steps = {}  # step name -> its result in this run (retrieve's captions and index steps included)
    for name, result in results.items():
        steps.update({name: result, **result.steps})
    result = results[key]
    up_to_date = set(result.shards_up_to_date)
    try:
        upstreams = step(key).upstream
    except StopIteration:  # a stage filed under no step of its own reads no upstream step
        return
    for upstream in upstreams:
        made = steps.get(upstream)
        if made is None or not made.shards_identical:
            continue
        single = step(upstream).single  # the index: every shard here read it
        shards = [] if single else sorted(up_to_date & set(made.shards_identical))
        if up_to_date and (single or shards):
            result.upstream_identical[upstream] = shards


def result_key(stage_name: str, config) -> str:
    """Where a config's result is filed: its own stage directory (an optimize variant's), else the stage."""
    return getattr(config, "stage", stage_name)


def report_lines(configs: StageConfigs, results: dict[str, Any]) -> list[str]:
    """What `pipeline run` prints: each stage module's `report` of each result, in DAG order."""
    from pipeline import stages  # the stage modules: numpy, not for `--help`

    lines = []
    for stage in stages.STAGES:
        for config in configs.of(stage.NAME):
            result = results.get(result_key(stage.NAME, config))
            if result is not None:
                lines += stage.report(result, config)
    return lines
