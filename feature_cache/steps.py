"""The steps a feature cache holds, in DAG order: each step's directory, the steps it is made from, the
`pipeline run` stage that makes it and the command a user runs to make it, and the optimize variants
(`optimize-{name}/` beside the default `optimize/`).

This is the cache's contract, read by the pipeline (which makes the steps: pipeline/stages.py registers the
stage that makes each) and by the trainers (which read them, and name the command that makes a missing one).
Adding a stage adds its steps here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError


@dataclass(frozen=True)
class Step:
    name: str  # its directory in the cache
    upstream: tuple[str, ...]  # the steps it is made from
    stage: str  # the `pipeline run` stage (and pipeline.toml section) that makes it
    command: str  # the command that makes it, with {cache}
    single: bool = False  # one task for the whole cache (the index), not one per embed shard


RETRIEVE_COMMAND = "pipeline retrieve --captions CORPUS --cache {cache}"
OPTIMIZE = "optimize"  # the optimize step, and the prefix of its variants' directories
STEPS: tuple[Step, ...] = (
    Step("embed", (), "embed", "pipeline embed INPUT... --cache {cache}"),
    Step("captions", (), "retrieve", RETRIEVE_COMMAND),
    Step("index", ("captions",), "retrieve", RETRIEVE_COMMAND, single=True),
    Step("retrieve", ("embed", "index"), "retrieve", RETRIEVE_COMMAND),
    Step(OPTIMIZE, ("embed", "retrieve"), "optimize", "pipeline optimize --cache {cache}"),
)


def step_names() -> tuple[str, ...]:
    return tuple(s.name for s in STEPS)


def stage_names() -> tuple[str, ...]:
    """embed, retrieve, optimize: the stages that make the steps, in order (what `pipeline run` runs)."""
    return tuple(dict.fromkeys(s.stage for s in STEPS))


def step(name: str) -> Step:
    """The step of a stage directory; an optimize variant (`optimize-NAME`) is the optimize step."""
    base = OPTIMIZE if name.startswith(f"{OPTIMIZE}-") else name
    return next(s for s in STEPS if s.name == base)


def command(name: str, cache: Path | str) -> str:
    """The command that makes step `name` (an optimize variant's included) in `cache`."""
    if name.startswith(f"{OPTIMIZE}-"):
        return f"pipeline optimize --variant {name.removeprefix(f'{OPTIMIZE}-')} --cache {cache}"
    return step(name).command.format(cache=cache)


VARIANT_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
VARIANT_DIR_RE = re.compile(rf"^{OPTIMIZE}(-[A-Za-z0-9_]{{1,64}})?$")


def variant_stage(variant: str) -> str:
    """`optimize` for the default variant (the layout caches always had), `optimize-{variant}` else."""
    return f"{OPTIMIZE}-{variant}" if variant else OPTIMIZE


def check_variant(variant: str) -> None:
    if variant and not VARIANT_RE.match(variant):
        raise ConfigError(f"--variant {variant}: use letters, digits and _ only (at most 64)")


def committed_variants(cache: Path) -> list[str]:
    """The variants a cache holds shards of: '' (the default) and every `optimize-{name}/`."""
    names = {p.parent.name for p in Path(cache).glob(f"{OPTIMIZE}*/_manifests")}
    return sorted(
        n.removeprefix(f"{OPTIMIZE}-") if n != OPTIMIZE else "" for n in names if VARIANT_DIR_RE.match(n)
    )
