"""`pipeline run`: embed, retrieve, optimize in order, each only on its stale shards.

Each stage plans against what its upstream has committed *after* the upstream ran, so staleness
propagates by digests: a remade embed shard with new bytes stales its retrieve and optimize shards, and
one that came out byte-identical stops the cascade. The whole run holds the cache lock.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.dag import STAGES
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
        if self.until not in STAGES:
            raise ConfigError(f"--until must be one of {', '.join(STAGES)}")
        for stage in self.force:
            if stage not in STAGES:
                raise ConfigError(f"--force {stage}: not a stage (stages: {', '.join(STAGES)})")
        if self.executor not in ("local", "dask"):
            raise ConfigError("--executor must be local or dask")

    def stages(self) -> tuple[str, ...]:
        return STAGES[: STAGES.index(self.until) + 1]


def config_from_section(cls, section: dict[str, Any], **overrides):
    """A stage config from its pipeline.toml section (keys are the CLI option names = config fields)."""
    names = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items() if k in names}
    values.update(overrides)
    return cls(**values)


@dataclass
class StageConfigs:
    embed: Any  # EmbedConfig
    retrieve: Any | None  # RetrieveConfig; None when no caption corpus is configured
    optimize: Any  # OptimizeConfig of the default variant
    variants: tuple = ()  # OptimizeConfig of each [optimize.variants.NAME], made beside it

    def optimizers(self) -> tuple:
        """Every optimize variant the config declares, the default first."""
        return (self.optimize, *self.variants)


def stage_configs(
    sections: dict[str, dict],
    cache: Path,
    force: tuple[str, ...] = (),
    *,
    verify: bool = False,
    repair: bool = False,
) -> StageConfigs:
    """Build every stage's config from the pipeline.toml sections, with one cache for all.

    `verify` and `repair` are the run's: embed re-hashes its inputs, and rebuilds a damaged shard plan.
    """
    from pipeline.embed import EmbedConfig
    from pipeline.optimize import OptimizeConfig
    from pipeline.retrieve import RetrieveConfig

    embed_section = sections.get("embed", {})
    embed = config_from_section(
        EmbedConfig, embed_section, cache=cache, force="embed" in force, verify=verify, repair=repair
    )
    if not embed.inputs:
        raise ConfigError(
            "pipeline.toml: [embed] inputs is empty; list the image folders, tars or Parquet files"
        )
    retrieve_section = dict(sections.get("retrieve", {}))
    retrieve = None
    if retrieve_section.get("captions"):
        retrieve_section.pop("dry_run", None)
        retrieve_section.update(cache=cache, force="retrieve" in force)
        retrieve_section["captions"] = tuple(retrieve_section["captions"])
        retrieve = RetrieveConfig.from_options(**retrieve_section)
    section = dict(sections.get("optimize", {}))
    declared = section.pop("variants", {})
    optimizers = [
        config_from_section(
            OptimizeConfig,
            {**section, **table},
            cache=cache,
            force="optimize" in force,
            verify=verify,
            variant=name,
        )
        for name, table in {"": {}, **declared}.items()
    ]
    for optimize in optimizers:
        optimize.validate()
        if retrieve is None and optimize.needs_neighbours:
            where = f"[optimize.variants.{optimize.variant}]" if optimize.variant else "[optimize]"
            raise ConfigError(
                f"pipeline.toml: [retrieve] captions is empty, but {where} method {optimize.method!r} needs "
                'retrieved captions; list a caption corpus, or set method = "perturb"'
            )
    return StageConfigs(embed, retrieve, optimizers[0], tuple(optimizers[1:]))


def run_pipeline(configs: StageConfigs, run: RunConfig, progress_factory=None) -> dict[str, Any]:
    """Run the stages in order under the cache lock; returns each stage's result object."""
    from manifests import verifying_outputs
    from manifests.lock import CacheLock
    from pipeline.executor import make_executor

    run.validate()
    results: dict[str, Any] = {}
    with CacheLock(run.cache, wait=run.wait), verifying_outputs(run.verify):
        executor = make_executor(run.executor, run.scheduler, run.workers)
        try:
            for stage in run.stages():
                if stage == "optimize":
                    for optimize in configs.optimizers():
                        results[optimize.stage] = _run_optimize(optimize, executor, progress_factory)
                else:
                    results[stage] = _run_stage(stage, configs, executor, progress_factory)
        finally:
            executor.close()
    return {stage: result for stage, result in results.items() if result is not None}


def _run_stage(stage: str, configs: StageConfigs, executor, progress_factory):
    if stage == "embed":
        from pipeline.embed import run_embed

        with _bar(progress_factory, "embed", "img") as advance:
            return run_embed(configs.embed, advance, executor)
    if configs.retrieve is None:
        return None
    from pipeline.progress import null_progress
    from pipeline.retrieve import run_retrieve

    return run_retrieve(configs.retrieve, progress_factory or null_progress, executor)


def _run_optimize(config, executor, progress_factory):
    from pipeline.optimize import run_optimize

    with _bar(progress_factory, config.stage, "img") as advance:
        return run_optimize(config, advance, executor)


def _bar(progress_factory, description: str, unit: str):
    from pipeline.progress import null_progress

    return (progress_factory or null_progress)(description, total=None, unit=unit)
