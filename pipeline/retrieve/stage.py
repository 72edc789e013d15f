"""Stage 2, `pipeline retrieve`: the top-k captions of every image, `retrieve/{i:05d}.parquet`.

Three cached steps, each with per-shard manifests like embed, each skipped when up to date:

1. `captions` (pipeline/retrieve/captions.py): caption corpus -> CLIP text features,
`captions/{j:05d}.parquet`.
   Shard j: keyed on the CLIP identity; dep = digest of its first caption_id and texts.
2. `index` (pipeline/retrieve/index.py): one task -> `index/captions.faiss` + `index/index.json`.
   Keyed on the index params; deps = every caption shard's Parquet output digest.
3. `retrieve` (pipeline/retrieve/search.py): one task per embed shard i -> `retrieve/{i:05d}.parquet` (`key`,
`nbr_ids`
   fixed_size_list<int64>[k], `nbr_sims` fixed_size_list<float32>[k], best first; same keys in the same
   order as `embed/{i:05d}.parquet`) + `retrieve/_stats/{i:05d}.json`.
   Keyed on k and the search method; deps = the embed shard's Parquet output digest + the index file's
   digest. A changed index stales every shard; an added embed shard is searched alone.

The CLIP is the embed stage's (`embedded_clip`), never passed again; captions encoded by another CLIP
(identity or dimension) are refused. `nbr_ids` are `caption_id`s: join them to `captions/*.parquet`.

This module runs the three steps in order; their configs, and the stage's, are pipeline/retrieve/config.py.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.progress import describe_drops, null_progress
from feature_cache.executor import ProgressFactory
from feature_cache.runner import StageResult, describe_shards
from manifests import list_manifests, read_stats
from pipeline.retrieve.captions import caption_shard_outputs, plan_captions, run_captions
from pipeline.retrieve.config import RetrieveConfig
from pipeline.retrieve.faiss_index import describe_choice
from pipeline.retrieve.index import index_manifest, plan_index, run_index
from pipeline.retrieve.search import STAGE, plan_search, search_shard
from pipeline.retrieve.status import captions_status, index_status, retrieve_status
from world.attribute_precision import ATTRIBUTES


def index_warnings(info: dict[str, Any]) -> list[str]:
    """What the index step warns about: a recall target it could not reach."""
    if info.get("target_reached", True):
        return []
    return [
        f"index recall@{info['k']} {info['recall_at_k']:.3f} is below --target-recall "
        f"{info['target_recall']} even with every IVF list probed (PQ codes lose accuracy); raise "
        "--max-index-memory or pass --index with a larger PQ"
    ]


def summary_lines(result: StageResult) -> list[str]:
    """What `pipeline retrieve` and `pipeline run` print after the stage: one line per step."""
    cap, index = result.steps["captions"], result.steps["index"]
    info, corpus = index.summary, cap.summary["corpus"]
    recall = f"recall@{info['k']} {info['recall_at_k']:.3f}"
    if info.get("nprobe"):
        recall += f" at nprobe {info['nprobe']}/{info['nlist']}"
    precision = ""
    if result.summary.get("precision_at_1"):
        p1 = result.summary["precision_at_1"]
        precision = "; precision@1 " + ", ".join(f"{a} {p1[a]:.2f}" for a in ATTRIBUTES)
    return [
        f"captions: {len(cap.shards_run)} shard(s) made ({cap.summary['encoded']:,} encoded, "
        f"{cap.summary['truncated']:,} truncated), {len(cap.shards_up_to_date)} up to date; "
        f"{cap.summary['n_captions']:,} unique captions from {corpus['records']:,} records, "
        f"{describe_drops(cap.dropped)}",
        f"index: {info['factory']} ({info['search']}) {'built' if index.shards_run else 'up to date'}, "
        f"{info['n_vectors']:,} vectors, {recall}",
        f"retrieve: {describe_shards(result)}; {result.rows_written:,} images searched{precision}; "
        f"{result.seconds:.1f} s",
    ]


def _check_k(config: RetrieveConfig, n_captions: int) -> None:
    if config.search.k > n_captions:
        raise ConfigError(
            f"--k {config.search.k} is larger than the caption corpus ({n_captions:,} unique captions)"
        )


def run_retrieve(
    config: RetrieveConfig, progress: ProgressFactory = null_progress, executor=None
) -> StageResult:
    """Captions, index, search: each step planned against its committed manifests and run if stale. The
    result is the search step's, with each step's in `steps` (captions, index).

    `progress(description, total, unit)` is a context manager yielding `advance(n, drop_reasons)`
    (`core.progress.progress_bar`). `executor` (feature_cache.executor) runs the shard tasks; the index
    is one task, and the search tasks read its file from the shared cache.
    """
    from feature_cache.clip_record import embedded_clip
    from feature_cache.runner import embed_rows, run_shards

    t0 = time.perf_counter()
    config.validate()
    cache = Path(config.captions.cache)
    clip = embedded_clip(cache)
    cplan = plan_captions(config.captions, clip)
    _check_k(config, cplan.n_captions)  # before encoding anything
    total = sum(len(t.texts) for t in cplan.tasks)
    with _bar(progress, f"captions: {len(cplan.tasks)} shard(s)", total, "txt", cplan.tasks) as advance:
        captions = run_captions(config.captions, clip, cplan, advance, executor)
    outs = caption_shard_outputs(cache, cplan.n_shards)
    index = run_index(config.index, outs, cplan.n_captions, clip.dim, progress, executor)

    splan = plan_search(config.search)
    rows = embed_rows(cache, splan.tasks)
    with _bar(progress, f"retrieve: {len(splan.tasks)} shard(s)", rows, "img", splan.tasks) as advance:
        run = run_shards(
            cache,
            STAGE,
            splan.tasks,
            search_shard,
            up_to_date=splan.up_to_date,
            executor=executor,
            progress=advance,
        )
    run.seconds = time.perf_counter() - t0  # the three steps'
    run.summary = retrieve_summary(cache)
    run.steps = {"captions": captions, "index": index}
    run.warnings = index_warnings(index.summary)
    return run


def _bar(progress: ProgressFactory, description: str, total: int, unit: str, tasks: list):
    return progress(description, total=total, unit=unit) if tasks else null_progress()


# The stage protocol (pipeline/engine/stage.py): what `pipeline run` calls.


def configure(sections: dict, cache: Path, *, force: bool, verify: bool, repair: bool) -> tuple:
    """() when [retrieve] lists no caption corpus: the stage is not configured."""
    section = dict(sections.get("retrieve", {}))
    if not section.get("captions"):
        return ()
    section.pop("dry_run", None)
    section.update(cache=cache, force=force, captions=tuple(section["captions"]))
    return (RetrieveConfig.from_options(**section),)


def run_stage(config: RetrieveConfig, executor, progress_factory) -> StageResult:
    return run_retrieve(config, progress_factory, executor)


def report(result: StageResult, config: RetrieveConfig) -> list[str]:
    return summary_lines(result)


def describe_retrieve(config: RetrieveConfig) -> dict[str, Any]:
    """The dry run: the resolved plan of all three steps (reads the corpus and manifests, writes nothing)."""
    from feature_cache.clip_record import embedded_clip

    config.validate()
    cache = Path(config.captions.cache)
    clip = embedded_clip(cache)
    cplan = plan_captions(config.captions, clip)
    _check_k(config, cplan.n_captions)
    outs = None if cplan.tasks or cplan.surplus else caption_shard_outputs(cache, cplan.n_shards)
    iplan = plan_index(config.index, outs, cplan.n_captions, clip.dim)
    index_changes = iplan.pending or iplan.task is not None
    embed = list_manifests(cache, "embed")
    if index_changes:
        search = {
            "to_run": "all"
            if index_manifest(cache) is None
            else "all, unless the rebuilt index file is byte-identical to the committed one",
            "shards": len(embed),
        }
    else:
        splan = plan_search(config.search)
        search = {
            "to_run": {t.spec.shard: t.reason for t in splan.tasks},
            "up_to_date": len(splan.up_to_date),
            "shards": len(embed),
        }
    return {
        "clip": {
            "model": clip.clip_model,
            "pretrained": clip.clip_pretrained,
            "identity": clip.identity,
            "dim": clip.dim,
        },
        "captions": {
            "corpus": cplan.corpus,
            "to_run": {t.spec.shard: t.reason for t in cplan.tasks},
            "up_to_date": len(cplan.up_to_date),
            "surplus_to_remove": cplan.surplus,
        },
        "index": {
            **describe_choice(iplan.choice, config.index, cplan.n_captions),
            "status": "pending: caption shards will change"
            if iplan.pending
            else (iplan.reason or "up to date"),
        },
        "retrieve": {
            "k": config.search.k,
            "method": config.search.method,
            "query_batch_size": config.search.batch_size,
            **search,
        },
    }


def retrieve_summary(cache: Path) -> dict[str, Any]:
    """Totals over the committed retrieve stats: images, and precision weighted by images scored."""
    totals = {"images": 0, "n_scored": 0}
    at_1: Counter = Counter()
    at_k: Counter = Counter()
    for shard in sorted(list_manifests(cache, STAGE)):
        stats = read_stats(cache, STAGE, shard)
        if stats is None:
            continue
        totals["images"] += stats["rows"]
        p = stats.get("precision")
        if p:
            totals["n_scored"] += p["n_scored"]
            for name, v in p["precision_at_1"].items():
                at_1[name] += v * p["n_scored"]
            for name, v in p["precision_at_k"].items():
                at_k[name] += v * p["n_scored"]
    if totals["n_scored"]:
        n = totals["n_scored"]
        totals["precision_at_1"] = {name: round(v / n, 4) for name, v in at_1.items()}
        totals["precision_at_k"] = {name: round(v / n, 4) for name, v in at_k.items()}
    return totals


NAME = "retrieve"  # the stage protocol (pipeline/engine/stage.py)
STATUS = {"captions": captions_status, "index": index_status, "retrieve": retrieve_status}
