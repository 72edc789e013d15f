"""Stage 1, `pipeline embed`: images in, CLIP image embeddings out, as WebDataset shards.

Pure core: `plan_embed(config)` decides which shards must be (re)made and why; `embed_shard(task)`
makes one shard and returns its manifest (a small dict, so it can run as a Dask task); `run_embed`
does both in-process. Reading and decoding run in DataLoader workers (threads inside a Dask worker),
CLIP runs batched in the main process (bf16 autocast on CUDA), and the writer commits the tar, the
sidecar Parquet, the stats and finally the manifest. The config, `EmbedConfig`, is pipeline/embed/config.py.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError
from core.paths import recorded_path
from feature_cache.executor import Progress  # (items just finished, reasons of those dropped)
from inputs.sources import expand_inputs, unit_keys
from inputs.units import Unit, key_prefix
from manifests import (
    Dep,
    ShardPlan,
    ShardSpec,
    check_shard,
    commit_manifest,
    group_units,
    list_manifests,
    read_manifest,
    write_json_atomic,
    write_stats,
)
from pipeline.embed.config import EmbedConfig
from pipeline.engine.step_status import StageStatus, committed_status, some_names
from storage import remote

if TYPE_CHECKING:
    from feature_cache.runner import StageResult

STAGE = "embed"
STAGE_VERSION = "1"
PLAN_FILE = "_plan.json"
# What the last run embedded from: its INPUTs made absolute and the options the plan depends on, so
# `pipeline status --cache` sees new and changed images without a pipeline.toml (`recorded_config`).
INPUTS_FILE = "_inputs.json"
INPUTS_VERSION = 1
RECORDED_OPTIONS = (
    "clip_model",
    "clip_pretrained",
    "image_size",
    "image_format",
    "quality",
    "max_pixels",
    "max_aspect",
    "shard_size",
    "key_prefix",
)
DROPPED_SOURCES = 100  # dropped inputs named per reason in a shard's stats
DROPPED_EXAMPLES = 3  # ... in its manifest, and printed at the end of a run


@dataclass
class EmbedTask:
    """Everything one shard needs; picklable so it can be shipped to a Dask worker."""

    config: EmbedConfig
    spec: ShardSpec
    units: list[Unit]
    reason: str  # why it is being (re)made


@dataclass
class EmbedPlan:
    tasks: list[EmbedTask]
    up_to_date: list[int]
    n_units: int
    planned_duplicates: int  # image files dropped at planning because their key was already taken
    clip_identity: dict[str, str]


def plan_embed(config: EmbedConfig, *, write_plan: bool = True) -> EmbedPlan:
    """Map inputs onto the append-only shard plan and find the shards that must be (re)made."""
    from core.clip import clip_identity

    config.validate()
    units = expand_inputs(list(config.inputs))
    identity = clip_identity(config.clip_model, config.clip_pretrained)
    stage_dir = Path(config.cache) / STAGE
    plan = load_plan(config, write=write_plan)
    by_id = {u.id: u for u in units}

    planned = plan.planned()

    def prefixed(unit: Unit) -> str:
        return key_prefix(unit, config.key_prefix) + unit.key

    taken = {prefixed(by_id[uid]) for uid in planned if uid in by_id and by_id[uid].kind == "image"}
    new_images, new_files, duplicates = [], [], 0
    for unit in units:
        if unit.id in planned:
            continue
        if unit.kind == "image":
            if prefixed(unit) in taken:  # a.jpg and a.png, or one path under two INPUT folders
                duplicates += 1
                continue
            taken.add(prefixed(unit))
            new_images.append(unit.id)
        else:
            new_files.append([unit.id])
    if plan.append(group_units(new_images, config.shard_size) + new_files) and write_plan:
        plan.save(stage_dir / PLAN_FILE)

    params = config.keyed_params(identity)
    tasks, up_to_date = [], []
    for shard, unit_ids in enumerate(plan.shards):
        members = [by_id[uid] for uid in unit_ids if uid in by_id]
        deps = [Dep(u.id, remote.digest_input(u.path, u.name)) for u in members]
        spec = ShardSpec(STAGE, shard, STAGE_VERSION, params, deps, config.unkeyed_params())
        reason = "forced" if config.force else check_shard(config.cache, spec, verify=config.verify)
        if reason is None and config.verify:
            reason = _changed_content(config.cache, shard, members)
        if reason is None:
            up_to_date.append(shard)
        else:
            tasks.append(EmbedTask(config, spec, members, reason))
    if tasks:
        check_unique_keys(config, tasks, up_to_date)
    return EmbedPlan(tasks, up_to_date, len(units), duplicates, identity)


def check_unique_keys(config: EmbedConfig, tasks: list[EmbedTask], up_to_date: list[int]) -> None:
    """Before anything is written: no key may come from two inputs (img2dataset and `pipeline synth`
    both number every download from 000000000), against the committed shards too. Keys repeated
    within one input are dropped as `duplicate_key` when written, as before. Runs only when there is
    work: it reads the new inputs' keys (tar headers) and the key column of every committed sidecar."""
    import pyarrow.parquet as pq

    from pipeline.embed.data import cache_key

    owner: dict[str, str | int] = {}  # cache key -> the input (path) holding it, or its committed shard
    sidecars = {}
    for shard in up_to_date:
        outs = read_manifest(config.cache, STAGE, shard)["outs"]
        sidecars[shard] = Path(config.cache) / next(o["path"] for o in outs if o["path"].endswith(".parquet"))
        for key in pq.read_table(sidecars[shard], columns=["key"])["key"].to_pylist():
            owner.setdefault(key, shard)
    for task in tasks:
        for unit in task.units:
            prefix = key_prefix(unit, config.key_prefix)
            for key in dict.fromkeys(cache_key(prefix + k) for k in unit_keys(unit)):
                other = owner.setdefault(key, unit.path)
                if isinstance(other, int):  # the committed row's source names its input
                    table = pq.read_table(sidecars[other], columns=["key", "source"]).to_pydict()
                    other = table["source"][table["key"].index(key)].split("#")[0]
                if other != unit.path:
                    raise ConfigError(_collision(config, key, other, unit))


def _collision(config: EmbedConfig, key: str, first: str, unit: Unit) -> str:
    fix = (
        "pass --key-prefix input to prefix each key with its input folder's name"
        if config.key_prefix == "none"
        else "pass --key-prefix TEMPLATE with {input}, {parent} and {stem}, such as '{parent}-{stem}'"
    )
    return f"inputs {first} and {unit.path} both hold key {key!r}, and keys must be unique in a cache; {fix}"


def absolute_input(spec: str) -> str:
    """An INPUT as the cache records it: absolute, a glob or brace pattern still one, so that it expands to
    the same units from any working directory (units are identified by absolute path)."""
    if remote.is_url(spec):
        return spec
    path = os.path.expanduser(spec)
    return path if os.path.isabs(path) else os.path.join(glob.escape(os.getcwd()), path)


def record_inputs(config: EmbedConfig) -> None:
    """Record what this run embeds from in `embed/_inputs.json` (rewritten only when it changed)."""
    record = {
        "version": INPUTS_VERSION,
        "inputs": [absolute_input(spec) for spec in config.inputs],
        **{name: getattr(config, name) for name in RECORDED_OPTIONS},
        "clip_model": recorded_path(config.clip_model),
        "clip_pretrained": recorded_path(config.clip_pretrained),
    }
    path = Path(config.cache) / STAGE / INPUTS_FILE
    try:
        if json.loads(path.read_bytes()) == record:
            return
    except (OSError, ValueError):
        pass
    write_json_atomic(path, record)


def recorded_config(cache: Path) -> EmbedConfig | None:
    """The config the cache's last embed run recorded (`record_inputs`), pointed at `cache`; None for a cache
    that recorded none (made before). A damaged record is `Unreadable`."""
    from manifests.errors import Unreadable, read_json

    path = Path(cache) / STAGE / INPUTS_FILE
    fix = f"rerun `pipeline embed INPUT... --cache {cache}` (or `pipeline run`) to record them again"
    try:
        record = read_json(path, fix)
    except FileNotFoundError:
        return None
    if not isinstance(record, dict) or record.get("version") != INPUTS_VERSION or not record.get("inputs"):
        raise Unreadable(f"{path}: not a record of embed inputs of version {INPUTS_VERSION}; {fix}")
    options = {name: record[name] for name in RECORDED_OPTIONS if name in record}
    return EmbedConfig(inputs=tuple(record["inputs"]), cache=Path(cache), **options)


def load_plan(config: EmbedConfig, *, write: bool) -> ShardPlan:
    """The cache's shard plan; a damaged one is an error naming `--repair`, which rebuilds it."""
    import warnings

    from manifests.errors import Unreadable

    path = Path(config.cache) / STAGE / PLAN_FILE
    fix = (
        f"rebuild it from the embed manifests with `pipeline run --cache {config.cache} --repair` "
        "(or `pipeline embed INPUT... --repair`)"
    )
    try:
        return ShardPlan.load(path, fix)
    except Unreadable:
        if not config.repair:
            raise
    manifests = list_manifests(config.cache, STAGE)
    plan = ShardPlan.from_manifests(manifests)
    warnings.warn(f"{path} was damaged: rebuilt from {len(manifests)} embed manifest(s)", stacklevel=2)
    if write:
        plan.save(path)
    return plan


def embed_shard(task: EmbedTask, progress: Progress | None = None) -> dict[str, Any]:
    """Make one embed shard and commit it; returns its manifest."""
    import torch

    from core.clip import cached_clip, encode_images
    from pipeline.embed.data import Prepared, ShardSamples, shard_loader
    from pipeline.embed.writer import EmbedShardWriter

    cfg, spec = task.config, task.spec
    t0 = time.perf_counter()
    bundle = cached_clip(cfg.clip_model, cfg.clip_pretrained, cfg.device)
    t_model = time.perf_counter()
    dataset = ShardSamples(
        task.units,
        image_size=cfg.image_size,
        image_format=cfg.image_format,
        quality=cfg.quality,
        max_pixels=cfg.max_pixels,
        clip_size=bundle.image_size,
        key_prefix=cfg.key_prefix,
        max_aspect=cfg.max_aspect,
    )
    loader = shard_loader(
        dataset, batch_size=cfg.batch_size, workers=cfg.workers, pin_memory=bundle.device.type == "cuda"
    )
    prepared: list[Prepared] = []
    embeddings: dict[int, np.ndarray] = {}
    dropped: Counter = Counter()
    dropped_sources: dict[str, list[str]] = {}  # reason -> the first DROPPED_SOURCES sources

    def drop(reason: str, source: str) -> None:
        dropped[reason] += 1
        named = dropped_sources.setdefault(reason, [])
        if len(named) < DROPPED_SOURCES:
            named.append(source)

    seen = 0
    t_encode = 0.0
    for ok, bad, pixels in loader:
        for it in bad:
            drop(it.reason, it.source)
        new_drops = [it.reason for it in bad]
        if ok:
            t = time.perf_counter()
            emb = encode_images(bundle, pixels)
            emb_np = emb.to(torch.float16).cpu().numpy()
            t_encode += time.perf_counter() - t
            finite = np.isfinite(emb_np).all(axis=1)
            for it, vec, good in zip(ok, emb_np, finite, strict=True):
                if good:
                    prepared.append(it)
                    embeddings[it.index] = vec
                else:
                    new_drops.append("non_finite_embedding")
                    drop("non_finite_embedding", it.meta["source"])
        seen += len(ok) + len(bad)
        if progress:
            progress(len(ok) + len(bad), new_drops)

    prepared.sort(key=lambda it: it.index)  # workers interleave batches: restore source order
    converted: Counter = Counter()
    stage_dir = Path(cfg.cache) / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)
    keys_written: set[str] = set()
    with EmbedShardWriter(cfg.cache, spec.shard, bundle.dim) as writer:
        for it in prepared:
            if it.key in keys_written:
                drop("duplicate_key", it.meta["source"])
                continue
            keys_written.add(it.key)
            for label in filter(None, (it.meta.get("converted") or "").split(",")):
                converted[label] += 1
            writer.write(it.key, it.image, it.ext, embeddings[it.index], it.meta)
        outs = writer.close()
    t_end = time.perf_counter()
    timings = {
        "total_s": round(t_end - t0, 4),
        "load_model_s": round(t_model - t0, 4),
        "encode_s": round(t_encode, 4),
        "images_per_s": round(len(keys_written) / max(t_end - t_model, 1e-9), 2),
    }
    stats = {
        "shard": spec.shard,
        "samples_read": seen,
        "written": len(keys_written),
        "dropped": dict(sorted(dropped.items())),
        "dropped_sources": dict(sorted(dropped_sources.items())),
        "converted": dict(sorted(converted.items())),
        "timings": timings,
    }
    write_stats(cfg.cache, STAGE, spec.shard, stats)
    # Content digests of the raw inputs, so `--verify` can later tell a real change from a touch.
    content = {u.id: remote.content_digest(u.path) for u in task.units if remote.exists(u.path)}
    extra = {
        "rows": len(keys_written),
        "dim": bundle.dim,
        "dropped": stats["dropped"],
        "dropped_examples": {r: s[:DROPPED_EXAMPLES] for r, s in stats["dropped_sources"].items()},
        "input_content": content,
    }
    return commit_manifest(cfg.cache, spec, outs, timings, extra=extra)


def check_first_run(config: EmbedConfig) -> None:
    """Before a first embed into a cache writes anything (the cache folder, its lock, the shard plan): the
    options, then the CLIP weights, which every shard of a first run needs, so a run that cannot load them
    leaves the cache as it was. A rerun loads the model only for a stale shard (an up-to-date cache stays
    usable offline), and `load_clip` checks the weights then."""
    from core.clip_weights import check_weights

    config.validate()
    if not (Path(config.cache) / STAGE / PLAN_FILE).exists():
        check_weights(config.clip_model, config.clip_pretrained)


def run_embed(config: EmbedConfig, progress: Progress | None = None, executor=None) -> StageResult:
    """Plan, then make every stale shard, in-process or on the given executor (`feature_cache.executor`)."""
    from feature_cache.runner import run_shards
    from inputs.sources import count_samples

    t0 = time.perf_counter()
    plan = plan_embed(config)
    record_inputs(config)
    units = [u for task in plan.tasks for u in task.units]
    run = run_shards(
        config.cache,
        STAGE,
        plan.tasks,
        embed_shard,
        up_to_date=plan.up_to_date,
        executor=executor,
        progress=progress,
        total=lambda: count_samples(units),  # the samples of the shards to run
    )
    if plan.planned_duplicates:
        run.dropped["duplicate_key"] = run.dropped.get("duplicate_key", 0) + plan.planned_duplicates
    examples: dict[str, list[str]] = {}
    for manifest in run.manifests:
        for reason, sources in manifest.get("dropped_examples", {}).items():
            examples[reason] = (examples.get(reason, []) + sources)[:DROPPED_EXAMPLES]
    run.summary = {"dropped_examples": dict(sorted(examples.items()))}
    run.seconds = time.perf_counter() - t0  # the plan included
    return run


# The stage protocol (pipeline/engine/stage.py): what `pipeline run` calls.


def configure(sections: dict, cache: Path, *, force: bool, verify: bool, repair: bool) -> tuple[EmbedConfig]:
    from pipeline.engine.config import config_from_section

    config = config_from_section(
        EmbedConfig, sections.get("embed", {}), cache=cache, force=force, verify=verify, repair=repair
    )
    if not config.inputs:
        raise ConfigError(
            "pipeline.toml: [embed] inputs is empty; list the image folders, tars or Parquet files"
        )
    return (config,)


def run_stage(config: EmbedConfig, executor, progress_factory) -> StageResult:
    with progress_factory("embed", total=None, unit="img") as advance:
        return run_embed(config, advance, executor)


def report(result: StageResult, config: EmbedConfig) -> list[str]:
    """What `pipeline embed` and `pipeline run` print after the stage."""
    from core.progress import describe_drops
    from feature_cache.runner import describe_shards

    return [
        f"embed: {describe_shards(result)}; {result.rows_written:,} images written, "
        f"{describe_drops(result.dropped)}; {result.seconds:.1f} s -> {Path(config.cache) / STAGE}",
        *describe_dropped_sources(result, config.cache),
    ]


def describe_dropped_sources(result: StageResult, cache: Path) -> list[str]:
    """A few dropped inputs per reason, for the end of a run; the stats keep the first 100 per shard."""
    lines = []
    for reason, sources in result.summary.get("dropped_examples", {}).items():
        more = result.dropped.get(reason, 0) - len(sources)
        tail = f" and {more:,} more (listed in {Path(cache) / STAGE / '_stats'})" if more > 0 else ""
        lines.append(f"  dropped {reason}: {', '.join(sources)}{tail}")
    return lines


def _changed_content(cache: Path, shard: int, members: list[Unit]) -> str | None:
    """`--verify`: sizes and mtimes can lie (copies that keep mtimes, coarse clocks); contents cannot."""
    recorded = (read_manifest(cache, STAGE, shard) or {}).get("input_content", {})
    for unit in members:
        if recorded.get(unit.id) != remote.content_digest(unit.path):
            return f"input content changed: {unit.name}"
    return None


def describe_plan(config: EmbedConfig, plan: EmbedPlan) -> dict[str, Any]:
    """What a dry run prints: the resolved config and the shards that would run, with reasons."""
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "clip": plan.clip_identity,
        "inputs": plan.n_units,
        "shards_to_run": {t.spec.shard: t.reason for t in plan.tasks},
        "shards_up_to_date": len(plan.up_to_date),
    }


def embed_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    """Against pipeline.toml's [embed] inputs, else those the cache's last embed run recorded
    (embed/_inputs.json); without either (a cache made before they were recorded), from its manifests."""
    from manifests.errors import Unreadable

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
    status.note = f"inputs as the last embed run recorded them: {some_names(config.inputs)}"
    return [status]


def _planned_embed(config) -> StageStatus:
    plan = plan_embed(config, write_plan=False)
    return StageStatus("embed", list(plan.up_to_date), {t.spec.shard: t.reason for t in plan.tasks})


def _unseen_inputs(cache: Path, why: str) -> StageStatus:
    status = committed_status(cache, "embed")
    status.note = f"{why}: new or changed images cannot be seen"
    return status


NAME = STAGE  # the stage protocol (pipeline/engine/stage.py)
STATUS = {"embed": embed_status}
