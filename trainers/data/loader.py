"""The trainers' one loader: images from the embed tars joined by key with a conditioning feature.

    loader = make_loader(LoaderConfig(cache=Path("cache"), condition="optimize", batch_size=64))
    batch = next(loader)  # image [B,3,H,W] in [-1,1], cond [B,D] unit-norm, key list[str], paired bool [B]

The conditions are in trainers/data/conditions.py, the embed rows and their images in
feature_cache/embed_rows.py and feature_cache/tar_images.py, and what counts as committed in
feature_cache/committed.py; the sample stream and the torch loader in trainers/data/stream.py; the stored,
read-per-batch sample set in trainers/data/sample_store.py.

`paired_fraction` / `paired_limit` mix real-caption features into the other conditions (see
`LoaderConfig`); the batch's `paired` flags say which rows got one.

A cache the condition can only partly use (a shard being rewritten, stale, or not made yet by its stage)
is waited for, re-reading the manifests for up to `PARTIAL_WAIT_S`, then refused with a `PartialCache`
naming the shards; `allow_partial` trains on the rest instead, and `LoaderInfo.record()` says exactly
which rows (the run's config.json and every eval.json of it keep that record). A damaged derived file in
`_trainers/` is recomputed with a warning.

Order: the sample stream is the concatenation of epoch permutations, epoch e from (seed, e); batch s is
stream positions [s*B, (s+1)*B) (under torchrun each rank loads its contiguous slice of it). So
`make_loader(cfg, start_step=s)` resumes by arithmetic, without decoding anything it skips, and every
random draw depends only on (seed, epoch, sample), never on the worker count.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError
from feature_cache.committed import PartialCache, describe_skipped
from feature_cache.embed_rows import EmbedRows, read_embed
from feature_cache.features import usable_rows
from manifests import digest_json, list_manifests
from trainers.data.conditions import (
    caption_features,
    caption_features_path,
    check_condition,
    condition_stage,
    missing_stage_error,
    optimize_features,
    parse_condition,
    retrieve_features,
)
from trainers.data.stream import POOL_STREAM, CacheDataset, CacheLoader

# How long a loader waits for shards being rewritten (or not made yet) to be committed before refusing a
# partial cache: a stage commits a shard's manifest right after replacing its files.
PARTIAL_WAIT_S = 30.0


PARTIAL_POLL_S = 1.0  # between re-reads of the manifests while waiting


@dataclass(frozen=True)
class LoaderConfig:
    cache: Path
    condition: str = "optimize"  # optimize[:VARIANT] | retrieve | perturb | caption
    batch_size: int = 64
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    paired_fraction: float = 0.0  # fraction of samples whose condition is the real-caption feature instead
    paired_limit: int | None = (
        None  # use real captions for at most N images (few-shot); the rest per `condition`
    )
    xi: float = 3.0  # LAFITE perturbation strength for condition="perturb"
    tau_r: float = 0.05  # softmax temperature for condition="retrieve"
    allow_partial: bool = False  # train on the usable shards when some are being rewritten, stale or unmade
    partial_wait_s: float | None = None  # seconds to wait for them to be committed; None: PARTIAL_WAIT_S

    def validate(self) -> None:
        check_condition(self.condition)
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.workers < 0:
            raise ConfigError("--workers must be 0 (load in the main process) or more")
        if self.seed < 0:
            raise ConfigError("--seed must be 0 or more")
        if not 0.0 <= self.paired_fraction <= 1.0:
            raise ConfigError("--paired-fraction must be between 0 and 1")
        if self.paired_limit is not None and self.paired_limit < 0:
            raise ConfigError("--paired-limit must be 0 or more")
        if self.condition == "caption" and self.paired_fraction > 0:
            raise ConfigError(
                "--paired-fraction mixes real captions into another condition; with --condition caption "
                "every sample is paired already (use --paired-limit N to train on N pairs only)"
            )
        if not np.isfinite(self.xi) or self.xi < 0:
            raise ConfigError("--xi must be a finite number >= 0")
        if not np.isfinite(self.tau_r) or self.tau_r <= 0:
            raise ConfigError("--tau-r must be a positive number")
        if self.partial_wait_s is not None and not self.partial_wait_s >= 0:
            raise ConfigError("partial_wait_s must be 0 or more seconds")

    @property
    def needs_captions(self) -> bool:
        return self.condition == "caption" or self.paired_fraction > 0 or bool(self.paired_limit)

    @property
    def paired_probability(self) -> float:
        """Chance that a pool image's sample uses its caption: `paired_limit` alone means always."""
        if self.paired_limit and self.paired_fraction == 0.0:
            return 1.0
        return self.paired_fraction


@dataclass
class LoaderInfo:
    """What the loader found: for logs and the run's config.json."""

    condition: str | None  # None: read for its images alone (the autoencoders)
    n_images: int  # images in the sample set
    image_size: int
    dim: int
    excluded: dict[str, int]  # embed rows left out, by reason
    paired_pool: int  # images that may be given their real caption's feature
    paired_probability: float  # chance a pool image's sample is paired, per epoch
    skipped_shards: dict[str, dict[int, str]]  # stage -> shard -> reason
    caption_features: str | None  # the shared caption-feature file, when captions were needed
    clip: dict[str, Any]  # clip_model, clip_pretrained, identity
    shards: dict[str, list[int]] = field(default_factory=dict)  # stage -> shards read
    keys_digest: str = ""  # digest_json of the sample set's keys, in sample order
    provenance: dict[str, Any] = field(default_factory=dict)  # where the condition came from (`provenance`)
    pair_keys: list[str] | None = None  # with paired_limit: the keys of the images given their caption

    def record(self) -> dict[str, Any]:
        """Exactly which rows a run trains on (plain JSON types): kept in its config.json and checkpoints,
        and copied into every eval.json of it, so a run on a partial cache (--allow-partial) says so."""
        return {
            "condition": self.condition,
            "n_images": self.n_images,
            "partial": bool(self.skipped_shards),
            "shards": {stage: list(shards) for stage, shards in self.shards.items()},
            "skipped_shards": {
                stage: {str(shard): why for shard, why in s.items()}
                for stage, s in self.skipped_shards.items()
            },
            "excluded": dict(self.excluded),
            "keys_digest": self.keys_digest,
            "pairs": self.paired_pool,
            "pairs_digest": digest_json(self.pair_keys) if self.pair_keys is not None else None,
            "provenance": self.provenance,
        }


def _read_sources(config: LoaderConfig) -> tuple[EmbedRows, np.ndarray | None, dict[str, dict[int, str]]]:
    """(embed rows, the optimize/retrieve features or None, stage -> shard -> why not usable), read once."""
    rows = read_embed(config.cache, warn=False)
    skipped = {"embed": rows.skipped_shards} if rows.skipped_shards else {}
    stage = condition_stage(config.condition)
    try:
        if stage.startswith("optimize"):
            cond, stage_skipped = optimize_features(rows, stage)
        elif stage == "retrieve":
            cond, stage_skipped = retrieve_features(rows, config.tau_r)
        else:
            return rows, None, skipped
    except PartialCache as e:
        rows.images.close()
        raise PartialCache(config.cache, {**skipped, **e.skipped}) from None
    except BaseException:
        rows.images.close()
        raise
    if stage_skipped:
        skipped[stage] = stage_skipped
    return rows, cond, skipped


def _read_committed(config: LoaderConfig) -> tuple[EmbedRows, np.ndarray | None, dict[str, dict[int, str]]]:
    """`_read_sources`, once every shard the condition reads is usable: while some are not (being
    rewritten, stale, not made yet), re-read up to `partial_wait_s`, then raise `PartialCache`; with
    `allow_partial`, take the usable ones at once (with a warning)."""
    wait = PARTIAL_WAIT_S if config.partial_wait_s is None else config.partial_wait_s
    start, told = time.monotonic(), False
    while True:
        try:
            found = _read_sources(config)
            skipped = found[2]
        except PartialCache as e:  # nothing usable at all yet
            found, skipped = None, e.skipped
        if found is not None and (not skipped or config.allow_partial):
            if skipped:
                warnings.warn(
                    f"--cache {config.cache}: --allow-partial: leaving out {describe_skipped(skipped)}",
                    stacklevel=3,
                )
            return found
        if found is not None:
            found[0].images.close()
        waited = time.monotonic() - start
        if waited >= wait:
            raise PartialCache(config.cache, skipped, waited, rest=found is not None)
        if not told:  # the wait can take `wait` seconds: say why
            told = True
            warnings.warn(
                f"--cache {config.cache}: waiting up to {wait:g} s for {describe_skipped(skipped)}",
                stacklevel=3,
            )
        time.sleep(min(PARTIAL_POLL_S, wait - waited))


def build_dataset(config: LoaderConfig) -> tuple[CacheDataset, LoaderInfo]:
    """The sample set: from its store (read per row) when one was derived (trainers/data/sample_store.py),
    else
    read from the cache and stored for the next loader."""
    from trainers.data.sample_store import AllRows, open_store, store_dir, store_key, write_store

    config.validate()
    folder = store_dir(config.cache, store_key(config, condition_stage(config.condition)))
    opened = open_store(Path(config.cache), folder)
    if opened is None:
        dataset, info = read_dataset(config)
        if info.skipped_shards:  # a partial cache is read as it is, every time
            return dataset, info
        write_store(folder, dataset, info, condition_stage(config.condition))
        opened = open_store(Path(config.cache), folder)
        if opened is None:  # could not be stored (read-only cache): the set in memory
            return dataset, info
        dataset.rows.images.close()
    record, rows, arrays = opened
    dataset = CacheDataset(
        rows,
        AllRows(len(rows)),
        arrays["cond"],
        seed=config.seed,
        perturb_xi=config.xi if config.condition == "perturb" else None,
        paired_feat=arrays.get("paired"),
        paired_pool=arrays["pool"],
        paired_probability=record["probability"],
    )
    return dataset, LoaderInfo(**record["info"])


def read_dataset(config: LoaderConfig) -> tuple[CacheDataset, LoaderInfo]:
    """Read the cache and join every image with its condition (see the module docstring)."""
    cache = Path(config.cache)
    rows, cond, skipped = _read_committed(config)
    excluded: Counter = Counter()
    keep = np.ones(len(rows), dtype=bool)
    stage = condition_stage(config.condition)
    from_stage, stage_skipped = cond is not None, skipped.get(stage, {})
    if from_stage:
        if stage_skipped:
            in_skipped = np.isin(rows.shard_of, list(stage_skipped))
            excluded[f"{stage}_shard_not_usable"] += int(in_skipped.sum())
            keep &= ~in_skipped
        reason = "no_usable_neighbours" if stage == "retrieve" else "no_optimize_row"
    else:
        cond, reason = rows.img_emb, "bad_img_emb"

    caption_feat, caption_path = None, None
    if config.needs_captions:
        caption_feat = caption_features(rows)
        caption_path = str(caption_features_path(rows))
        if config.condition == "caption":
            cond, reason = caption_feat, "no_caption"
    usable = usable_rows(cond)
    excluded[reason] += int((keep & ~usable).sum())
    keep &= usable
    rows_idx = np.flatnonzero(keep)
    if len(rows_idx) == 0:
        if config.condition == "caption":
            raise ConfigError(
                f"--cache {cache}: no image in the cache has a caption, so --condition caption has "
                "nothing to train on; embed images that have captions or pick another --condition"
            )
        raise missing_stage_error(cache, config.condition)

    if config.condition == "caption":
        if config.paired_limit is not None:  # a supervised few-shot baseline: only N pairs
            chosen = _pool_subset(len(rows_idx), config.paired_limit, config.seed)
            excluded["beyond_paired_limit"] += len(rows_idx) - len(chosen)
            rows_idx = rows_idx[chosen]
            if len(rows_idx) == 0:
                raise ConfigError("--paired-limit 0 with --condition caption leaves nothing to train on")
        pool = np.ones(len(rows_idx), dtype=bool)
        paired_feat, probability = None, 1.0  # `cond` is the caption feature already
    elif caption_feat is not None:
        candidates = np.flatnonzero(usable_rows(caption_feat[rows_idx]))
        if len(candidates) == 0:
            raise ConfigError(
                f"--cache {cache}: --paired-fraction/--paired-limit need images with captions, and none "
                f"of the {len(rows_idx)} images has one"
            )
        if config.paired_limit is not None:
            candidates = candidates[_pool_subset(len(candidates), config.paired_limit, config.seed)]
        pool = np.zeros(len(rows_idx), dtype=bool)
        pool[candidates] = True
        paired_feat = np.where(pool[:, None], caption_feat[rows_idx], np.nan).astype(np.float16)
        probability = config.paired_probability if pool.any() else 0.0
    else:
        pool, paired_feat, probability = np.zeros(len(rows_idx), dtype=bool), None, 0.0

    dataset = CacheDataset(
        rows,
        rows_idx,
        cond[rows_idx].astype(np.float16),
        seed=config.seed,
        perturb_xi=config.xi if config.condition == "perturb" else None,
        paired_feat=paired_feat,
        paired_pool=pool,
        paired_probability=probability,
    )
    if rows.image_size == 0:
        rows.image(int(rows_idx[0]))  # the first image decides the size of a --image-size 0 cache
    info = LoaderInfo(
        condition=config.condition,
        n_images=len(rows_idx),
        image_size=rows.image_size,
        dim=rows.clip.dim,
        excluded={k: v for k, v in sorted(excluded.items()) if v},
        paired_pool=int(pool.sum()),
        paired_probability=float(probability),
        skipped_shards=skipped,
        caption_features=caption_path,
        clip={
            "clip_model": rows.clip.clip_model,
            "clip_pretrained": rows.clip.clip_pretrained,
            "identity": rows.clip.identity,
        },
        shards={
            "embed": list(rows.shards),
            **({stage: [s for s in rows.shards if s not in stage_skipped]} if from_stage else {}),
        },
        keys_digest=digest_json([rows.keys[int(r)] for r in rows_idx]),
        provenance=provenance(config, rows, [s for s in rows.shards if s not in stage_skipped]),
        pair_keys=[rows.keys[int(r)] for r in rows_idx[pool]] if config.paired_limit is not None else None,
    )
    return dataset, info


def provenance(config: LoaderConfig, rows: EmbedRows, shards: list[int]) -> dict[str, Any]:
    """Exactly where a run's condition came from: the stage and variant, the method and keyed params its
    shards were made with, and a digest of those shards' manifests (their keys and output digests), so
    two runs agree on it only when they read the same features. Perturb and caption are computed here
    from the embed stage, with the loader's own params."""
    base, variant = parse_condition(config.condition)
    stage = condition_stage(config.condition)
    manifests = list_manifests(rows.cache, stage)
    made = [manifests[s] for s in shards if s in manifests]
    params = [m.get("params", {}) for m in made]
    if base == "perturb":
        method, keyed = "perturb", {"xi": config.xi, "seed": config.seed}
    elif base == "caption":
        method, keyed = "caption", {}
    elif base == "retrieve":
        method, keyed = "retrieve", {"tau_r": config.tau_r, "search": params[0] if params else {}}
    else:
        method, keyed = (params[0].get("method") if params else None), params[0] if params else {}
    return {
        "stage": stage,
        "variant": variant if base == "optimize" else None,
        "method": method,
        "params": keyed,
        "mixed_params": any(p != params[0] for p in params),  # shards made with different params
        "manifests_digest": digest_json(
            [[m["shard"], m.get("key"), [o["digest"] for o in m["outs"]]] for m in made]
        ),
    }


def _pool_subset(n: int, limit: int, seed: int) -> np.ndarray:
    """A fixed, seeded choice of min(limit, n) of n candidates (sorted, so sample order stays shard order)."""
    chosen = np.random.default_rng([seed, POOL_STREAM]).permutation(n)[: min(limit, n)]
    return np.sort(chosen)


def make_loader(config: LoaderConfig, start_step: int = 0, world: Any = None) -> CacheLoader:
    """Infinite iterator of batches (see the module docstring); `.info` describes the sample set. `world`
    (trainers.runtime.distributed.World): under torchrun, this rank's slice of each global batch."""
    if start_step < 0:
        raise ConfigError("start_step must be 0 or more")
    if world is not None:
        world.local_batch(config.batch_size)
    dataset, info = build_dataset(config)
    return CacheLoader(dataset, info, config.batch_size, start_step, config.workers, world)


# The trainer config fields the cache loader takes (trainers.data.loader.LoaderConfig), where a config has
# them.
LOADER_FIELDS = (
    *("condition", "batch_size", "seed", "workers"),
    *("paired_fraction", "paired_limit", "allow_partial"),
)


def cache_loader_config(config: Any, **overrides: Any):
    """The cache loader's config (trainers.data.loader.LoaderConfig) from a trainer config's LOADER_FIELDS."""
    from trainers.data.loader import LoaderConfig

    given = {name: getattr(config, name) for name in LOADER_FIELDS if hasattr(config, name)}
    return LoaderConfig(cache=Path(config.cache), **{**given, **overrides})
