"""`pipeline status`: per stage, which shards are up to date and why the others are stale.

Reads only manifests, stats files and file stats (sizes, mtimes), never the data: images are judged
against pipeline.toml's [embed] inputs, else those the last embed run recorded (embed/_inputs.json), and
the caption corpus by its files' sizes and mtimes, recorded when the captions step last ran. Staleness flows
downstream: an embed shard that will be remade stales its retrieve and optimize shards; a caption
corpus that changed stales the index and so every retrieve and optimize shard.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError
from feature_cache import steps
from pipeline import stages
from pipeline.engine.step_status import StageStatus, committed_status, some_names


def pipeline_status(cache: Path, configs=None, *, configured_cache: Path | None = None) -> list[StageStatus]:
    """Every step of feature_cache/steps.py in order (an optimize variant per configured one), then every
    other stage the cache holds manifests of (undeclared variants, latents/...).

    `configs`: the run's StageConfigs (pipeline.run); a stage without one is judged from its committed
    manifests alone (embed: from the inputs its last run recorded). `configured_cache`: the cache those
    configs were written for (pipeline.toml's); another one is compared with them only if it is a cache.
    A path that is not a cache (missing; without an embed/ folder or any manifests while nothing is
    configured; without an embed/ folder while it is not the configured cache) is a ConfigError.
    """
    cache = Path(cache)
    if not cache.is_dir():
        raise ConfigError(
            f"--cache {cache}: no such directory; `pipeline run` (or `pipeline embed`) makes it"
        )
    others = other_stages(cache)
    elsewhere = configured_cache is not None and not _same_path(cache, configured_cache)
    no_manifests = not others and next(cache.glob("*/_manifests/*.json"), None) is None
    if not (cache / "embed").is_dir() and (elsewhere or configs is None and no_manifests):
        toml = f"; pipeline.toml's cache is {configured_cache}" if elsewhere else ""
        raise ConfigError(f"--cache {cache}: no pipeline cache here (no embed/ folder){toml}")
    result: list[StageStatus] = []
    judged: dict[str, StageStatus] = {}
    for step in steps.STEPS:
        stage_configs = configs.of(step.stage) if configs is not None else ()
        upstream = {name: judged.get(name, StageStatus(name)) for name in step.upstream}
        statuses = stages.status_function(step.name)(cache, stage_configs, upstream)
        if statuses:
            judged[step.name] = statuses[0]
        result += statuses
    if elsewhere and configs is not None and configs.of("embed"):
        judged["embed"].note = _compared_inputs(cache, configs.of("embed")[0], configured_cache)
    shown = {s.stage for s in result}
    return result + [committed_status(cache, stage) for stage in others if stage not in shown]


def _same_path(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _compared_inputs(cache: Path, config, configured_cache: Path) -> str:
    """Which inputs a cache other than pipeline.toml's is compared with: the toml's, as `pipeline run
    --cache` would embed them; and the cache's own record when it differs."""
    from manifests.errors import Unreadable
    from pipeline.embed.stage import absolute_input, recorded_config

    note = f"inputs from pipeline.toml, whose cache is {configured_cache}: {some_names(config.inputs)}"
    try:
        recorded = recorded_config(cache)
    except Unreadable:
        recorded = None
    if recorded is not None and list(recorded.inputs) != [absolute_input(i) for i in config.inputs]:
        note += f"; this cache was last embedded from {some_names(recorded.inputs)}"
    return note


def other_stages(cache: Path) -> list[str]:
    """Stages outside the pipeline's own that hold manifests, such as `latents/{vae_id}`."""
    found = {p.parent.relative_to(cache).as_posix() for p in Path(cache).glob("*/*/_manifests")}
    found |= {p.parent.name for p in Path(cache).glob("*/_manifests")}
    return sorted(found - set(steps.step_names()))


def render_status(stages: list[StageStatus], limit: int = 10) -> str:
    lines = []
    for s in stages:
        head = f"{s.stage:9s} {len(s.up_to_date):6,d} up to date, {len(s.stale):6,d} stale"
        lines.append(head + (f"  ({s.note})" if s.note else ""))
        for shard, reason in sorted(s.stale.items())[:limit]:
            lines.append(f"          {shard:05d}  {reason}")
        if len(s.stale) > limit:
            lines.append(f"          ... and {len(s.stale) - limit:,} more (--json lists all)")
    return "\n".join(lines)
