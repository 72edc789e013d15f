"""`pipeline status`: per stage, which shards are up to date and why the others are stale.

Reads only manifests, stats files and file stats (sizes, mtimes), never the data: images are judged
against pipeline.toml's [embed] inputs, else those the last embed run recorded (embed/_inputs.json), and
the caption corpus by its files' sizes and mtimes, recorded when the captions step last ran. Staleness flows
downstream: an embed shard that will be remade stales its retrieve and optimize shards; a caption
corpus that changed stales the index and so every retrieve and optimize shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests import absent_reason, check_outputs, digest_input_file, list_manifests
from manifests.errors import read_json
from manifests.manifest import MANIFEST_DIR
from pipeline import dag
from pipeline.errors import ConfigError


@dataclass
class StageStatus:
    stage: str
    up_to_date: list[int] = field(default_factory=list)
    stale: dict[int, str] = field(default_factory=dict)  # shard -> reason
    note: str = ""  # stage-level remark (not configured, ...)

    def mark(self, shard: int, reason: str) -> None:
        """Stale `shard` for `reason`, keeping a reason it already has of its own."""
        if shard in self.up_to_date:
            self.up_to_date.remove(shard)
        self.stale.setdefault(shard, reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "up_to_date": len(self.up_to_date),
            "stale": {str(k): v for k, v in sorted(self.stale.items())},
            "note": self.note,
        }


def _committed(cache: Path, stage: str) -> StageStatus:
    """Status from the committed manifests alone: each shard is fine unless its outputs were altered."""
    status = StageStatus(stage)
    for shard, manifest in sorted(list_manifests(cache, stage).items()):
        reason = check_outputs(cache, manifest)
        if reason:
            status.stale[shard] = reason
        else:
            status.up_to_date.append(shard)
    return status


def embed_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    """Against pipeline.toml's [embed] inputs, else those the cache's last embed run recorded
    (embed/_inputs.json); without either (a cache made before they were recorded), from its manifests."""
    from manifests.errors import Unreadable
    from pipeline.embed import recorded_config

    if configs and configs[0].inputs:
        return [_planned_embed(configs[0])]
    try:
        config = recorded_config(cache)
    except Unreadable as e:
        return [_unseen_inputs(cache, str(e))]
    if config is None:
        return [_unseen_inputs(cache, "inputs neither configured nor recorded in the cache")]
    try:
        status = _planned_embed(config)
    except ConfigError as e:  # an input gone, a CLIP config moved: `pipeline embed` would say the same
        return [_unseen_inputs(cache, f"the recorded inputs cannot be planned ({e})")]
    status.note = f"inputs as the last embed run recorded them: {_some(config.inputs)}"
    return [status]


def _planned_embed(config) -> StageStatus:
    from pipeline.embed import plan_embed

    plan = plan_embed(config, write_plan=False)
    return StageStatus("embed", list(plan.up_to_date), {t.spec.shard: t.reason for t in plan.tasks})


def _unseen_inputs(cache: Path, why: str) -> StageStatus:
    status = _committed(cache, "embed")
    status.note = f"{why}: new or changed images cannot be seen"
    return status


def _some(names, limit: int = 2) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def captions_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    """Stat-only: the corpus files against those recorded by the last captions run."""
    return [_captions_status(cache, configs[0] if configs else None)]


def _captions_status(cache: Path, config) -> StageStatus:
    status = _committed(cache, "captions")
    if config is None:
        status.note = "captions not configured"
        return status
    from pipeline.captions import CORPUS_FILE
    from pipeline.corpus import corpus_files

    try:
        corpus = read_json(cache / CORPUS_FILE, f"rerun `pipeline retrieve --cache {cache}`")
        recorded = corpus.get("file_digests", {})
    except FileNotFoundError:
        recorded = None
    current = {str(p.resolve()) for p in corpus_files(config.captions.corpus)}
    if recorded is None or not status.up_to_date and not status.stale:
        status.note = "never built"
        status.stale.setdefault(0, "new shard")
        return status
    # Older caches recorded each file as it was spelled (relative to where that run was): compare resolved
    # paths, and each file's stats digest under the name it was recorded with.
    spelled = {str(Path(name).resolve()): name for name in recorded}
    changed = sorted(set(current) ^ set(spelled))
    changed += [
        p for p in current & set(spelled) if digest_input_file(Path(p), spelled[p]) != recorded[spelled[p]]
    ]
    if changed:
        status.note = "corpus changed: " + ", ".join(Path(p).name for p in changed[:3])
        for shard in list(status.up_to_date):
            status.mark(shard, "corpus changed (shards re-checked by content when run)")
    return status


def index_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    return [_index_status(cache, upstream["captions"])]


def _index_status(cache: Path, captions: StageStatus) -> StageStatus:
    status = _committed(cache, "index")
    if not status.up_to_date and not status.stale:
        status.stale[0] = "new shard"
    elif captions.stale:
        status.mark(0, "upstream changed: captions")
    else:
        deps = {d["digest"] for d in list_manifests(cache, "index")[0].get("deps", [])}
        outs = {
            o["digest"]
            for m in list_manifests(cache, "captions").values()
            for o in m["outs"]
            if o["path"].endswith(".parquet")
        }
        if deps != outs:
            status.mark(0, "upstream changed: captions")
    return status


def retrieve_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    return [_retrieve_status(cache, configs[0] if configs else None, upstream["embed"], upstream["index"])]


def _retrieve_status(cache: Path, config, embed: StageStatus, index: StageStatus) -> StageStatus:
    from pipeline.search import plan_search

    shards = sorted(set(embed.up_to_date) | set(embed.stale))
    if config is None:
        status = _committed(cache, "retrieve")
        status.note = "captions not configured"
    elif index.stale:
        status = StageStatus("retrieve", [], {s: "upstream changed: index" for s in shards})
        return status
    else:
        try:
            plan = plan_search(config.search)
            status = StageStatus(
                "retrieve", list(plan.up_to_date), {t.spec.shard: t.reason for t in plan.tasks}
            )
        except ConfigError:  # an embed shard is damaged or missing: it will be redone first
            status = _committed(cache, "retrieve")
    for shard in shards:
        if shard in embed.stale:
            status.mark(shard, "upstream changed: embed")
        elif shard not in status.up_to_date:
            status.stale.setdefault(shard, absent_reason(cache, "retrieve", shard))
    return status


def optimize_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    """Each configured variant's (none while embed has no shards); without a config, the committed default."""
    from pipeline.optimize_config import STAGE

    embed = upstream["embed"]
    if configs and (embed.up_to_date or embed.stale):
        return [_optimize_status(cache, c, embed, upstream["retrieve"]) for c in configs]
    if not configs and (cache / STAGE / MANIFEST_DIR).is_dir():
        optimize = _committed(cache, STAGE)
        optimize.note = "not configured: judged from its manifests"
        _mark_committed_upstream(cache, optimize, embed, upstream["retrieve"])
        return [optimize]
    return []


def _mark_committed_upstream(
    cache: Path, status: StageStatus, embed: StageStatus, retrieve: StageStatus
) -> None:
    """An unconfigured optimize stage: stale where embed is, or retrieve is and the shard read it, and where
    an embed shard has no optimize shard yet."""
    manifests = list_manifests(cache, status.stage)
    for shard in sorted(set(embed.up_to_date) | set(embed.stale)):
        deps = manifests.get(shard, {}).get("deps", [])
        if shard in embed.stale:
            status.mark(shard, "upstream changed: embed")
        elif shard in retrieve.stale and any(d["name"].startswith("retrieve/") for d in deps):
            status.mark(shard, "upstream changed: retrieve")
        elif shard not in status.up_to_date:
            status.stale.setdefault(shard, absent_reason(cache, status.stage, shard))


def _optimize_status(cache: Path, config, embed: StageStatus, retrieve: StageStatus) -> StageStatus:
    from pipeline.optimize import plan_optimize

    shards = sorted(set(embed.up_to_date) | set(embed.stale))
    upstream = {s: "upstream changed: embed" for s in embed.stale}
    if config.needs_neighbours:
        upstream.update({s: "upstream changed: retrieve" for s in retrieve.stale if s not in upstream})
    try:
        plan = plan_optimize(config)
        status = StageStatus(
            config.stage, list(plan.up_to_date), {t.spec.shard: t.reason for t in plan.tasks}
        )
    except ConfigError:  # an upstream shard is missing or older: it will be redone first
        status = _committed(cache, config.stage)
    for shard in shards:
        if shard in upstream:
            status.mark(shard, upstream[shard])
        elif shard not in status.up_to_date:
            status.stale.setdefault(shard, absent_reason(cache, config.stage, shard))
    return status


def pipeline_status(cache: Path, configs=None, *, configured_cache: Path | None = None) -> list[StageStatus]:
    """Every step of pipeline.dag in order (an optimize variant per configured one), then every other stage
    the cache holds manifests of (undeclared variants, latents/...).

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
    for step in dag.STEPS:
        stage_configs = configs.of(step.stage) if configs is not None else ()
        upstream = {name: judged.get(name, StageStatus(name)) for name in step.upstream}
        statuses = step.status_function()(cache, stage_configs, upstream)
        if statuses:
            judged[step.name] = statuses[0]
        result += statuses
    if elsewhere and configs is not None and configs.of("embed"):
        judged["embed"].note = _compared_inputs(cache, configs.of("embed")[0], configured_cache)
    shown = {s.stage for s in result}
    return result + [_committed(cache, stage) for stage in others if stage not in shown]


def _same_path(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _compared_inputs(cache: Path, config, configured_cache: Path) -> str:
    """Which inputs a cache other than pipeline.toml's is compared with: the toml's, as `pipeline run
    --cache` would embed them; and the cache's own record when it differs."""
    from manifests.errors import Unreadable
    from pipeline.embed import absolute_input, recorded_config

    note = f"inputs from pipeline.toml, whose cache is {configured_cache}: {_some(config.inputs)}"
    try:
        recorded = recorded_config(cache)
    except Unreadable:
        recorded = None
    if recorded is not None and list(recorded.inputs) != [absolute_input(i) for i in config.inputs]:
        note += f"; this cache was last embedded from {_some(recorded.inputs)}"
    return note


def other_stages(cache: Path) -> list[str]:
    """Stages outside the pipeline's own that hold manifests, such as `latents/{vae_id}`."""
    found = {p.parent.relative_to(cache).as_posix() for p in Path(cache).glob("*/*/_manifests")}
    found |= {p.parent.name for p in Path(cache).glob("*/_manifests")}
    return sorted(found - set(dag.step_names()))


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
