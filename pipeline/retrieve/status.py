"""The status functions of the retrieve stage's three steps (captions, index, retrieve), from manifests,
stats files and file stats only (pipeline/status.py says how `pipeline status` judges a cache)."""

from __future__ import annotations

import posixpath
from pathlib import Path

from core.errors import ConfigError
from manifests import absent_reason, list_manifests
from manifests.errors import read_json
from pipeline.engine.step_status import StageStatus, committed_status
from storage import remote


def captions_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    """Stat-only: the corpus files against those recorded by the last captions run."""
    return [_captions_status(cache, configs[0] if configs else None)]


def _captions_status(cache: Path, config) -> StageStatus:
    status = committed_status(cache, "captions")
    if config is None:
        status.note = "captions not configured"
        return status
    from pipeline.retrieve.captions import CORPUS_FILE
    from pipeline.retrieve.corpus import corpus_files

    try:
        corpus = read_json(cache / CORPUS_FILE, f"rerun `pipeline retrieve --cache {cache}`")
        recorded = corpus.get("file_digests", {})
    except FileNotFoundError:
        recorded = None
    current = set(corpus_files(config.captions.corpus))
    if recorded is None or not status.up_to_date and not status.stale:
        status.note = "never built"
        status.stale.setdefault(0, "new shard")
        return status
    # Older caches recorded each file as it was spelled (relative to where that run was): compare resolved
    # paths, and each file's stats digest under the name it was recorded with.
    spelled = {name if remote.is_url(name) else str(Path(name).resolve()): name for name in recorded}
    changed = sorted(set(current) ^ set(spelled))
    changed += [
        p for p in current & set(spelled) if remote.digest_input(p, spelled[p]) != recorded[spelled[p]]
    ]
    if changed:
        status.note = "corpus changed: " + ", ".join(posixpath.basename(p) for p in changed[:3])
        for shard in list(status.up_to_date):
            status.mark(shard, "corpus changed (shards re-checked by content when run)")
    return status


def index_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    return [_index_status(cache, upstream["captions"])]


def _index_status(cache: Path, captions: StageStatus) -> StageStatus:
    status = committed_status(cache, "index")
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
    from pipeline.retrieve.search import plan_search

    shards = sorted(set(embed.up_to_date) | set(embed.stale))
    if config is None:
        status = committed_status(cache, "retrieve")
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
            status = committed_status(cache, "retrieve")
    for shard in shards:
        if shard in embed.stale:
            status.mark(shard, "upstream changed: embed")
        elif shard not in status.up_to_date:
            status.stale.setdefault(shard, absent_reason(cache, "retrieve", shard))
    return status
