"""Stage 3, `pipeline optimize`: one pseudo text feature per image, `optimize/{i:05d}.parquet`.

Pure core: `plan_optimize(config)` decides which shards must be (re)made and why; `optimize_shard(task)`
makes one shard and returns its manifest; `run_optimize` does both, in-process or on a Dask executor.
The maths lives in `methods/run.py`, the reading of inputs in `pipeline/optimize/inputs.py`,
the config (methods, defaults, what is keyed, variants) in `pipeline/optimize/config.py`.
Shard i reads `embed/{i:05d}.parquet` (image features, keys, labels) and, for `retrieve` and `optimize`,
`retrieve/{i:05d}.parquet` (neighbour caption ids and similarities) plus the caption features of every
`captions/{j:05d}.parquet`, loaded once per process.

Output columns: `key` (the embed sidecar's order, skipped rows left out), `pseudo_txt` (float16 [D],
unit-norm), `cos_init` and `cos_final` (cosine of the image embedding with the method's starting point
and with the stored output: the starting point is h0, the retrieve mix, for `optimize` and `retrieve`
(so the two are equal for `retrieve`), and the image embedding itself for `perturb`, so its
`cos_init` is 1), `method`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError
from feature_cache.caption_bank import cached_caption_bank
from feature_cache.committed import caption_deps
from feature_cache.executor import Progress
from feature_cache.layout import optimize_schema, shard_file, shard_out
from manifests import (
    Dep,
    ShardSpec,
    absent_reason,
    check_outputs,
    check_shard,
    commit_manifest,
    list_manifests,
    read_stats,
    stat_out,
    write_parquet_atomic,
    write_stats,
)
from manifests.manifest import MANIFEST_DIR
from pipeline.engine.step_status import StageStatus, committed_status, mark_committed_upstream
from pipeline.optimize.config import (
    STAGE,
    STAGE_VERSION,
    OptimizeConfig,
)
from pipeline.optimize.inputs import read_shard_rows

if TYPE_CHECKING:
    from feature_cache.runner import StageResult

NOISE_STREAM, SHUFFLE_STREAM = 0, 1  # numpy stream ids under (seed, shard)


@dataclass(frozen=True)
class ShardInputs:
    """Where shard i's inputs are, relative to the cache."""

    embed: str  # embed/{i:05d}.parquet
    retrieve: str | None  # retrieve/{i:05d}.parquet (None for perturb)
    captions: tuple[Dep, ...] = ()  # every caption shard: (relative path, output digest)


@dataclass
class OptimizeTask:
    """Everything one shard needs; picklable so it can be shipped to a Dask worker."""

    config: OptimizeConfig
    spec: ShardSpec
    inputs: ShardInputs
    dim: int  # feature dimension (the embed stage's CLIP)
    reason: str  # why it is being (re)made


@dataclass
class OptimizePlan:
    tasks: list[OptimizeTask]
    up_to_date: list[int]
    dim: int


def plan_optimize(config: OptimizeConfig) -> OptimizePlan:
    """Find the shards that must be (re)made; refuses (ConfigError) when an upstream shard is missing."""
    from feature_cache.clip_record import embedded_clip

    config.validate()
    cache = Path(config.cache)
    dim = embedded_clip(cache).dim  # also refuses a cache without an embed stage, or with mixed models
    embed = list_manifests(cache, "embed")
    captions: tuple[Dep, ...] = ()
    retrieve: dict[int, dict[str, Any]] = {}
    if config.needs_neighbours:
        retrieve = list_manifests(cache, "retrieve")
        missing = sorted(set(embed) - set(retrieve))
        if missing:
            shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ConfigError(
                f"--method {config.method} needs the retrieve stage, but {len(missing)} of {len(embed)} "
                f"retrieve shard(s) are missing ({shown}); run `pipeline retrieve --cache {cache}` first, "
                "or use --method perturb"
            )
        captions = caption_deps(cache)

    tasks, up_to_date = [], []
    for shard, manifest in sorted(embed.items()):
        embed_rel = shard_file("embed", shard)
        out = shard_out(manifest)
        if out is None or check_outputs(cache, {"outs": [out]}) is not None:
            raise ConfigError(f"embed shard {shard}: {embed_rel} missing or altered; rerun `pipeline embed`")
        deps = [Dep(embed_rel, out["digest"])]
        retrieve_rel = None
        if config.needs_neighbours:
            retrieve_rel = shard_file("retrieve", shard)
            r_manifest = retrieve[shard]
            r_out = shard_out(r_manifest)
            if r_out is None or check_outputs(cache, {"outs": [r_out]}) is not None:
                raise ConfigError(
                    f"retrieve shard {shard}: {retrieve_rel} is missing or altered; rerun `pipeline retrieve`"
                )
            embed_digests = {o["digest"] for o in manifest.get("outs", [])}
            if not embed_digests & {d["digest"] for d in r_manifest.get("deps", [])}:
                raise ConfigError(
                    f"retrieve shard {shard} was made from an older embed shard {shard}; "
                    f"rerun `pipeline retrieve --cache {cache}`"
                )
            deps.append(Dep(retrieve_rel, r_out["digest"]))
            deps.extend(captions)
        params = config.keyed_params(dim, manifest.get("rows"))
        spec = ShardSpec(config.stage, shard, STAGE_VERSION, params, deps, config.unkeyed_params())
        reason = "forced" if config.force else check_shard(cache, spec, verify=config.verify)
        if reason is None:
            up_to_date.append(shard)
        else:
            inputs = ShardInputs(embed_rel, retrieve_rel, captions)
            tasks.append(OptimizeTask(config, spec, inputs, dim, reason))
    return OptimizePlan(tasks, up_to_date, dim)


# ---------------------------------------------------------------------------------------------------------
# Quality figures
# ---------------------------------------------------------------------------------------------------------


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 6) if len(values) else None


# ---------------------------------------------------------------------------------------------------------
# One shard: read -> compute -> quality figures -> write
# ---------------------------------------------------------------------------------------------------------


def optimize_shard(task: OptimizeTask, progress: Progress | None = None) -> dict[str, Any]:
    """Make one optimize shard and commit it; returns its manifest."""
    from dataclasses import replace

    import pyarrow as pa
    import torch

    from core.clip import resolve_device
    from kernels.contrastive import resolve_backend
    from methods.common import Neighbours, nearest_caption_precision, split_batches
    from methods.registry import METHODS
    from methods.run import pseudo_txt_features

    cfg, spec, dim = task.config, task.spec, task.dim
    cache = Path(cfg.cache)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    bank = cached_caption_bank(cache, task.inputs.captions, dim) if cfg.needs_neighbours else None
    rows = read_shard_rows(cache, task.inputs, dim, bank)
    dropped, n = rows.dropped, len(rows.keep)
    if progress and dropped:
        progress(0, [reason for reason, count in dropped.items() for _ in range(count)])
    t_read = time.perf_counter()

    f = torch.from_numpy(rows.f).to(device)  # [n, D]
    batches = split_batches(n, cfg.batch_size, np.random.default_rng([cfg.seed, spec.shard, SHUFFLE_STREAM]))
    noise = nbrs = None
    method = METHODS[cfg.method]
    if method.needs_noise:
        # Drawn for every row of the shard, so a skipped row does not shift the noise of the others.
        rng = np.random.default_rng([cfg.seed, spec.shard, NOISE_STREAM])
        noise = torch.from_numpy(rng.standard_normal((len(rows.keys), dim), dtype=np.float32)[rows.keep])
        noise = noise.to(device)
    if bank is not None:
        nbrs = Neighbours(
            bank=bank.on(device)[0],
            rows=torch.from_numpy(rows.nbr_rows).to(device),
            sims=torch.from_numpy(rows.nbr_sims).to(device),
            valid=torch.from_numpy(rows.nbr_valid).to(device),
        )
    on_batch = (lambda b: progress(b, [])) if progress else None
    hp = cfg.hyper(dim, device)
    # Resolved once (under auto: the kernel's first-use self-check) and pinned, so the stats say what ran.
    loss_backend, self_check = resolve_backend(hp.backend, device, getattr(torch, hp.loss_dtype), dim)
    hp = replace(hp, backend=loss_backend)
    feats = pseudo_txt_features(f, hp, batches, nbrs=nbrs, noise=noise, progress=on_batch)
    t_compute = time.perf_counter()

    # Never write NaN or a non-unit vector: check what is actually stored (float16).
    stored = feats.h_final.to(torch.float16)  # [n, D]
    stored_norm = stored.float().norm(dim=1)
    good = (torch.isfinite(stored).all(dim=1) & ((stored_norm - 1).abs() < 1e-2)).cpu().numpy()
    if not good.all():
        dropped["degenerate_result"] += int((~good).sum())
    cos_init = (f * feats.h_init).sum(dim=1).cpu().numpy()[good]
    cos_final = ((f * stored.float()).sum(dim=1) / stored_norm.clamp_min(1e-12)).cpu().numpy()[good]
    precision_init = precision_final = None
    if bank is not None:
        truths = [t if ok else None for t, ok in zip(rows.truths, good.tolist(), strict=True)]
        precision_init = nearest_caption_precision(bank, feats.h_init, truths, device)
        refined = not torch.equal(feats.h_final, feats.h_init)
        precision_final = (
            nearest_caption_precision(bank, feats.h_final, truths, device) if refined else precision_init
        )
    t_quality = time.perf_counter()

    written_keys = [rows.keys[i] for i in rows.keep[good]]
    pseudo = stored.cpu().numpy()[good]
    table = pa.table(
        {
            "key": pa.array(written_keys, pa.string()),
            "pseudo_txt": pa.FixedSizeListArray.from_arrays(pa.array(pseudo.reshape(-1), pa.float16()), dim),
            "cos_init": pa.array(cos_init, pa.float32()),
            "cos_final": pa.array(cos_final, pa.float32()),
            "method": pa.array([cfg.method] * len(written_keys), pa.string()),
        },
        schema=optimize_schema(dim),
    )
    rel = shard_file(spec.stage, spec.shard)
    size, digest = write_parquet_atomic(cache / rel, table)
    outs = [stat_out(cache, rel, size, digest, table.num_rows)]
    t_end = time.perf_counter()
    timings = {
        "total_s": round(t_end - t0, 4),
        "read_s": round(t_read - t0, 4),
        "compute_s": round(t_compute - t_read, 4),
        "quality_s": round(t_quality - t_compute, 4),
        "images_per_s": round(n / max(t_compute - t_read, 1e-9), 2),
    }

    def figure(value: float) -> float | None:
        return round(value, 6) if n else None

    stats = {
        "shard": spec.shard,
        "method": cfg.method,
        "params": spec.params,
        "rows_in": len(rows.keys),
        "written": len(written_keys),
        "dropped": dict(sorted(dropped.items())),
        "cos_init": _mean(cos_init),
        "cos_final": _mean(cos_final),
        "top1_init": figure(feats.top1_init),
        "top1_final": figure(feats.top1_final),
        "loss_init": figure(feats.loss_init),
        "loss_final": figure(feats.loss_final),
        "proximity_final": figure(feats.proximity_final),
        "steps": cfg.steps if "steps" in method.keyed else 0,
        "batches": feats.n_batches,
        "batch_size": feats.batch_size,
        "attr_precision_init": precision_init,
        "attr_precision_final": precision_final,
        "device": str(device),
        "loss_dtype": cfg.loss_dtype(device),
        "loss_backend": loss_backend,
        "self_check": self_check.summary() if self_check else None,  # when auto considered triton
        "timings": timings,
    }
    write_stats(cache, spec.stage, spec.shard, stats)
    extra = {"rows": len(written_keys), "dim": dim, "dropped": stats["dropped"]}
    return commit_manifest(cache, spec, outs, timings, extra=extra)


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


def run_optimize(config: OptimizeConfig, progress: Progress | None = None, executor=None) -> StageResult:
    """Plan, then make every stale shard, in-process or on the given executor (`feature_cache.executor`)."""
    from feature_cache.runner import embed_rows, run_shards

    t0 = time.perf_counter()
    plan = plan_optimize(config)
    run = run_shards(
        config.cache,
        config.stage,
        plan.tasks,
        optimize_shard,
        up_to_date=plan.up_to_date,
        executor=executor,
        progress=progress,
        total=lambda: embed_rows(config.cache, plan.tasks),
    )
    run.summary = stage_summary(config.cache, sorted(plan.up_to_date + run.shards_run), config.stage)
    run.seconds = time.perf_counter() - t0  # the plan included
    return run


# The stage protocol (pipeline/engine/stage.py): what `pipeline run` calls.


def configure(sections: dict, cache: Path, *, force: bool, verify: bool, repair: bool) -> tuple:
    """The default config, then one per [optimize.variants.NAME]; a method that needs neighbours without a
    caption corpus in [retrieve] is refused."""
    from pipeline.engine.config import config_from_section

    section = dict(sections.get("optimize", {}))
    declared = section.pop("variants", {})
    configs = []
    for name, table in {"": {}, **declared}.items():
        config = config_from_section(
            OptimizeConfig, {**section, **table}, cache=cache, force=force, verify=verify, variant=name
        )
        config.validate()
        if config.needs_neighbours and not sections.get("retrieve", {}).get("captions"):
            where = f"[optimize.variants.{name}]" if name else "[optimize]"
            raise ConfigError(
                f"pipeline.toml: [retrieve] captions is empty, but {where} method {config.method!r} needs "
                'retrieved captions; list a caption corpus, or set method = "perturb"'
            )
        configs.append(config)
    return tuple(configs)


def run_stage(config: OptimizeConfig, executor, progress_factory) -> StageResult:
    with progress_factory(config.stage, total=None, unit="img") as advance:
        return run_optimize(config, advance, executor)


def report(result: StageResult, config: OptimizeConfig) -> list[str]:
    """What `pipeline optimize` and `pipeline run` print after the stage: its shards, then the quality
    figures over every shard of the stage (`stage_summary`), before -> after."""
    from core.progress import describe_drops
    from feature_cache.runner import describe_shards

    s = result.summary

    def change(name: str, fmt: str = ".3f") -> str:
        before, after = s.get(f"{name}_init"), s.get(f"{name}_final")
        return "n/a" if before is None or after is None else f"{before:{fmt}} -> {after:{fmt}}"

    return [
        f"{config.stage}: {describe_shards(result)}; {s.get('written', 0):,} pseudo features "
        f"({', '.join(s.get('methods', [])) or config.method}), {describe_drops(result.dropped)}; "
        f"{result.seconds:.1f} s -> {Path(config.cache) / config.stage}",
        f"  cos(image, pseudo) {change('cos')}; in-batch top-1 {change('top1')}; "
        f"InfoNCE {change('loss')}; attribute precision {change('attr_precision')}",
    ]


def describe_plan(config: OptimizeConfig, plan: OptimizePlan) -> dict[str, Any]:
    """What a dry run prints: the resolved config and the shards that would run, with reasons."""
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "keyed_params": config.keyed_params(plan.dim),
        "dim": plan.dim,
        "shards_to_run": {t.spec.shard: t.reason for t in plan.tasks},
        "shards_up_to_date": len(plan.up_to_date),
    }


SUMMARY_MEANS = ("cos_init", "cos_final", "top1_init", "top1_final", "loss_init", "loss_final")


def stage_summary(cache: Path, shards: list[int] | None = None, stage: str = STAGE) -> dict[str, Any]:
    """Totals and written-weighted means over the committed stats files (all of them, or `shards`)."""
    totals: Counter = Counter()
    sums: Counter = Counter()
    weights: Counter = Counter()
    methods: set[str] = set()
    for shard in sorted(list_manifests(cache, stage)):
        stats = read_stats(cache, stage, shard) if shards is None or shard in shards else None
        if stats is None:
            continue
        methods.add(stats["method"])
        totals["shards"] += 1
        totals["written"] += stats["written"]
        totals.update({f"dropped_{k}": v for k, v in stats["dropped"].items()})
        for name in SUMMARY_MEANS:
            if stats.get(name) is not None:
                sums[name] += stats[name] * stats["written"]
                weights[name] += stats["written"]
        for when in ("init", "final"):
            precision = stats.get(f"attr_precision_{when}")
            if precision and precision.get("mean") is not None:
                sums[f"attr_precision_{when}"] += precision["mean"] * precision["n"]
                weights[f"attr_precision_{when}"] += precision["n"]
    summary: dict[str, Any] = dict(totals)
    summary["methods"] = sorted(methods)
    for name, weight in weights.items():
        summary[name] = round(sums[name] / weight, 6) if weight else None
    return summary


def optimize_status(cache: Path, configs: tuple, upstream: dict) -> list[StageStatus]:
    """Each configured variant's (none while embed has no shards); without a config, the committed default."""

    embed = upstream["embed"]
    if configs and (embed.up_to_date or embed.stale):
        return [_optimize_status(cache, c, embed, upstream["retrieve"]) for c in configs]
    if not configs and (cache / STAGE / MANIFEST_DIR).is_dir():
        optimize = committed_status(cache, STAGE)
        optimize.note = "not configured: judged from its manifests"
        mark_committed_upstream(cache, optimize, embed, upstream["retrieve"])
        return [optimize]
    return []


def _optimize_status(cache: Path, config, embed: StageStatus, retrieve: StageStatus) -> StageStatus:
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
        status = committed_status(cache, config.stage)
    for shard in shards:
        if shard in upstream:
            status.mark(shard, upstream[shard])
        elif shard not in status.up_to_date:
            status.stale.setdefault(shard, absent_reason(cache, config.stage, shard))
    return status


NAME = STAGE  # the stage protocol (pipeline/engine/stage.py)
STATUS = {STAGE: optimize_status}
