"""The pipeline's registry in DAG order: its stages (what `pipeline run` runs) and their steps (the stage
directories a cache holds), what each step is made from and which command makes it.

`pipeline run` configures and runs the stages in this order (`--until`, `--force` name them, and each has
its pipeline.toml section), `pipeline status` asks each step's status function in this order, and the
trainers name the command that makes a missing step from it. Adding a stage is its module plus a line in
STAGE_LIST and one per step in STEPS.

A stage's module is its protocol; it defines

    configure(sections, cache, *, force, verify, repair) -> tuple of configs   # () = not configured
    run_stage(config, executor, progress_factory) -> result                    # plans, runs, commits
    report(result, config) -> list of lines                                    # what `pipeline run` prints

and a step's status function is `(cache, configs, upstream) -> list[StageStatus]` (pipeline/status.py),
given its stage's configs and the status of each upstream step by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    name: str  # what --until and --force name, and its pipeline.toml section
    module: str  # the module that implements it (configure, run_stage, report)

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)


@dataclass(frozen=True)
class Step:
    name: str  # its directory in the cache
    upstream: tuple[str, ...]  # the steps it is made from
    stage: str  # the `pipeline run` stage (and pipeline.toml section) that makes it
    command: str  # the command that makes it, with {cache}
    status: str  # "module:function" judging its shards (see the module docstring)
    single: bool = False  # one task for the whole cache (the index), not one per embed shard

    def status_function(self) -> Callable:
        module, _, name = self.status.partition(":")
        return getattr(importlib.import_module(module), name)


STAGE_LIST: tuple[Stage, ...] = (
    Stage("embed", "pipeline.embed"),
    Stage("retrieve", "pipeline.retrieve"),
    Stage("optimize", "pipeline.optimize"),
)
RETRIEVE_COMMAND = "pipeline retrieve --captions CORPUS --cache {cache}"
STEPS: tuple[Step, ...] = (
    Step("embed", (), "embed", "pipeline embed INPUT... --cache {cache}", "pipeline.status:embed_status"),
    Step("captions", (), "retrieve", RETRIEVE_COMMAND, "pipeline.status:captions_status"),
    Step("index", ("captions",), "retrieve", RETRIEVE_COMMAND, "pipeline.status:index_status", single=True),
    Step("retrieve", ("embed", "index"), "retrieve", RETRIEVE_COMMAND, "pipeline.status:retrieve_status"),
    Step(
        "optimize",
        ("embed", "retrieve"),
        "optimize",
        "pipeline optimize --cache {cache}",
        "pipeline.status:optimize_status",
    ),
)


def stage_names() -> tuple[str, ...]:
    """embed, retrieve, optimize: what `pipeline run` runs, in order."""
    return tuple(s.name for s in STAGE_LIST)


def step_names() -> tuple[str, ...]:
    return tuple(s.name for s in STEPS)


def stage(name: str) -> Stage:
    return next(s for s in STAGE_LIST if s.name == name)


def step(name: str) -> Step:
    """The step of a stage directory; an optimize variant (`optimize-NAME`) is the optimize step."""
    base = "optimize" if name.startswith("optimize-") else name
    return next(s for s in STEPS if s.name == base)


def command(name: str, cache: Path | str) -> str:
    """The command that makes step `name` (an optimize variant's included) in `cache`."""
    if name.startswith("optimize-"):
        return f"pipeline optimize --variant {name.removeprefix('optimize-')} --cache {cache}"
    return step(name).command.format(cache=cache)
