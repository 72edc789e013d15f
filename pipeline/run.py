"""`pipeline run`: embed, retrieve, optimize in order, each only on its stale shards.

Each stage plans against what its upstream has committed *after* the upstream ran, so staleness
propagates by digests: a remade embed shard with new bytes stales its retrieve and optimize shards, and
one that came out byte-identical stops the cascade. The whole run holds the cache lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import dag
from pipeline.errors import ConfigError


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
        stages = dag.stage_names()
        if self.until not in stages:
            raise ConfigError(f"--until must be one of {', '.join(stages)}")
        for name in self.force:
            if name not in stages:
                raise ConfigError(f"--force {name}: not a stage (stages: {', '.join(stages)})")
        if self.executor not in ("local", "dask"):
            raise ConfigError("--executor must be local or dask")

    def stages(self) -> tuple[str, ...]:
        stages = dag.stage_names()
        return stages[: stages.index(self.until) + 1]


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
    return StageConfigs(
        {
            stage.name: tuple(
                stage.implementation().configure(
                    sections, cache, force=stage.name in force, verify=verify, repair=repair
                )
            )
            for stage in dag.STAGE_LIST
        }
    )


def run_pipeline(configs: StageConfigs, run: RunConfig, progress_factory=None) -> dict[str, Any]:
    """Run the stages in order under the cache lock; returns each config's result by its stage directory
    (`optimize-mix` for a variant)."""
    from manifests import verifying_outputs
    from manifests.lock import CacheLock
    from pipeline.executor import make_executor
    from pipeline.progress import null_progress

    run.validate()
    results: dict[str, Any] = {}
    with CacheLock(run.cache, wait=run.wait), verifying_outputs(run.verify):
        executor = make_executor(run.executor, run.scheduler, run.workers)
        try:
            for name in run.stages():
                module = dag.stage(name).implementation()
                for config in configs.of(name):
                    results[result_key(name, config)] = module.run_stage(
                        config, executor, progress_factory or null_progress
                    )
        finally:
            executor.close()
    return results


def result_key(stage_name: str, config) -> str:
    """Where a config's result is filed: its own stage directory (an optimize variant's), else the stage."""
    return getattr(config, "stage", stage_name)


def report_lines(configs: StageConfigs, results: dict[str, Any]) -> list[str]:
    """What `pipeline run` prints: each stage module's `report` of each result, in DAG order."""
    lines = []
    for entry in dag.STAGE_LIST:
        for config in configs.of(entry.name):
            result = results.get(result_key(entry.name, config))
            if result is not None:
                lines += entry.implementation().report(result, config)
    return lines
