"""The pipeline's steps in DAG order: the one place that says which stage directories a cache holds,
what each is made from, which user-facing stage it belongs to and which command makes it.

`pipeline run` runs the stages in this order (`--until`, `--force` name them), `pipeline status`
reports the steps in it, and the trainers name the command that makes a missing step from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Step:
    name: str  # its directory in the cache
    upstream: tuple[str, ...]  # the steps it is made from
    stage: str  # the `pipeline run` stage (and pipeline.toml section) that makes it
    command: str  # the command that makes it, with {cache}


RETRIEVE_COMMAND = "pipeline retrieve --captions CORPUS --cache {cache}"
STEPS: tuple[Step, ...] = (
    Step("embed", (), "embed", "pipeline embed INPUT... --cache {cache}"),
    Step("captions", (), "retrieve", RETRIEVE_COMMAND),
    Step("index", ("captions",), "retrieve", RETRIEVE_COMMAND),
    Step("retrieve", ("embed", "index"), "retrieve", RETRIEVE_COMMAND),
    Step("optimize", ("embed", "retrieve"), "optimize", "pipeline optimize --cache {cache}"),
)
STEP_NAMES = tuple(s.name for s in STEPS)
STAGES = tuple(dict.fromkeys(s.stage for s in STEPS))  # embed, retrieve, optimize: what `pipeline run` runs


def step(name: str) -> Step:
    """The step of a stage directory; an optimize variant (`optimize-NAME`) is the optimize step."""
    base = "optimize" if name.startswith("optimize-") else name
    return next(s for s in STEPS if s.name == base)


def command(name: str, cache: Path | str) -> str:
    """The command that makes step `name` (an optimize variant's included) in `cache`."""
    if name.startswith("optimize-"):
        return f"pipeline optimize --variant {name.removeprefix('optimize-')} --cache {cache}"
    return step(name).command.format(cache=cache)
