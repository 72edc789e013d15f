"""`trainers vae --encode`: the VAE latents of every committed embed shard, computed once, shared by runs.

    {cache}/latents/{vae_id}/{i:05d}.parquet               key string, latent fixed_size_list<float32>[C*h*w]
    {cache}/latents/{vae_id}/_manifests/{i:05d}.json       the commit point (manifests.commit_manifest)

`vae_id` is the first 12 hex digits of the VAE checkpoint's content digest, so two VAEs never share a
folder. Each latents shard derives from the embed shard with the same index; its key hashes the full VAE
digest and the embed shard's tar and Parquet output digests, so a rerun does nothing when every shard is
up to date, and a new (or remade) embed shard is encoded alone.

The latent stored is the *unscaled* posterior mean (eval mode, no sampling) in float32: exactly what
`trainers ldm` would compute on the fly (it multiplies by its `latent_scale` afterwards), so a run that
reads the cache takes the same steps as one that does not. The latent shape is in the Parquet schema
metadata (`latent_shape`) and in the manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manifests import (
    Dep,
    ShardSpec,
    check_shard,
    commit_manifest,
    digest_file_content,
    list_manifests,
    stat_out,
    write_parquet_atomic,
)
from pipeline.errors import ConfigError, require_at_least
from pipeline.layout import latents_schema, shard_file
from pipeline.stage import run_shards

STAGE_ROOT = "latents"
STAGE_VERSION = "1"
ID_HEX = 12


def vae_digest(checkpoint: Path) -> str:
    """Content digest of a VAE checkpoint file (what the latents are keyed on)."""
    return digest_file_content(Path(checkpoint))


def latents_stage(digest: str) -> str:
    """`latents/{vae_id}`: the stage (and folder) of one VAE's latents."""
    return f"{STAGE_ROOT}/{digest[:ID_HEX]}"


def _embed_deps(rows, shard: int) -> list[Dep]:
    """The embed shard's committed outputs (sidecar Parquet and tar), by digest."""
    outs = [rows.parquet_outs[shard], rows.images.tar_outs[shard]]
    return [Dep(o["path"], o["digest"]) for o in outs]


@dataclass
class EncodeSummary:
    stage: str  # latents/{vae_id}
    vae_digest: str
    shards_total: int
    shards_run: list[int]
    shards_up_to_date: list[int]
    reasons: dict[int, str] = field(default_factory=dict)  # shard -> why it was (re)made
    latents_written: int = 0
    latent_shape: tuple[int, ...] | None = None
    seconds: float = 0.0


def encode_latents(
    cache: Path | str,
    vae_checkpoint: Path | str,
    batch_size: int = 64,
    device: str = "auto",
    progress: Any = None,
) -> EncodeSummary:
    """Encode every committed embed shard whose latents are missing or stale; returns what was done.

    `vae_checkpoint`: a `trainers vae` checkpoint file or run directory (its latest checkpoint).
    `progress(n)` is called with the images just encoded."""
    from trainers.embed_rows import read_embed
    from trainers.runs import select_device
    from trainers.vae import load_vae

    require_at_least(("--batch-size", batch_size, 1))
    t0 = time.perf_counter()
    cache = Path(cache)
    if not cache.is_dir():
        raise ConfigError(f"--cache {cache}: no such directory")
    vae, ckpt = load_vae(vae_checkpoint, "--encode")
    digest = vae_digest(Path(ckpt["path"]))
    stage = latents_stage(digest)
    rows = read_embed(cache)
    try:
        resolution = int(ckpt["arch"]["resolution"])
        if rows.image_size and rows.image_size != resolution:
            raise ConfigError(
                f"--encode {ckpt['path']}: trained on {resolution}px images, the cache has "
                f"{rows.image_size}px ones"
            )
        params = {"vae_digest": digest, "dtype": "float32", "posterior": "mean"}
        unkeyed = {"vae_path": ckpt["path"], "vae_step": int(ckpt["step"]), "batch_size": batch_size}
        todo, summary = [], EncodeSummary(stage, digest, len(rows.shards), [], [])
        for shard in rows.shards:
            spec = ShardSpec(stage, shard, STAGE_VERSION, params, _embed_deps(rows, shard), unkeyed)
            reason = check_shard(cache, spec)
            if reason is None:
                summary.shards_up_to_date.append(shard)
            else:
                todo.append(spec)
                summary.reasons[shard] = reason
        if not todo:
            summary.seconds = time.perf_counter() - t0
            return summary
        encoder = LatentEncoder(rows, vae.to(select_device(device)), ckpt, digest, batch_size)
        run = run_shards(cache, stage, [EncodeTask(spec) for spec in todo], encoder, progress=progress)
        summary.shards_run = run.shards_run
        summary.latents_written = run.rows
        summary.latent_shape = tuple(run.manifests[-1]["latent_shape"])
        summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        rows.images.close()


@dataclass(frozen=True)
class EncodeTask:
    spec: ShardSpec  # the latents shard to make, keyed on the VAE and its embed shard


@dataclass
class LatentEncoder:
    """Makes one latents shard (`pipeline.stage.run_shards`' `fn`): the posterior means of its embed
    shard's images, in sidecar order, written and committed."""

    rows: Any  # trainers.embed_rows.EmbedRows
    vae: Any  # the frozen VAE, on its device
    ckpt: dict[str, Any]
    digest: str  # the VAE checkpoint's content digest
    batch_size: int

    def __call__(self, task: EncodeTask, progress: Any = None) -> dict[str, Any]:
        spec, rows, t_shard = task.spec, self.rows, time.perf_counter()
        device = next(self.vae.parameters()).device
        members = np.flatnonzero((rows.shard_of == spec.shard) & (rows.offsets >= 0))
        keys, chunks = [], []
        for i in range(0, len(members), self.batch_size):
            idx = members[i : i + self.batch_size]
            images = rows.pixels(idx).float().div_(127.5).sub_(1.0)  # as the loader: [B, 3, R, R]
            with torch.no_grad():
                mean, _ = self.vae.encode(images.to(device))
            chunks.append(mean.float().cpu().numpy())  # [B, C, h, w]
            keys += [rows.keys[int(r)] for r in idx]
            if progress is not None:
                progress(len(idx))
        shape = tuple(chunks[0].shape[1:]) if chunks else _latent_shape(self.ckpt)
        dim = int(np.prod(shape))
        flat = np.concatenate(chunks).reshape(len(keys), dim) if chunks else np.zeros((0, dim))
        table = _table(keys, flat.astype(np.float32), shape)
        rel = shard_file(spec.stage, spec.shard)
        size, out_digest = write_parquet_atomic(rows.cache / rel, table)
        outs = [stat_out(rows.cache, rel, size, out_digest, rows=len(keys))]
        timings = {"total_s": round(time.perf_counter() - t_shard, 4)}
        extra = {"rows": len(keys), "latent_shape": list(shape), "vae_id": self.digest[:ID_HEX]}
        return commit_manifest(rows.cache, spec, outs, timings, extra=extra)


def _latent_shape(ckpt: dict[str, Any]) -> tuple[int, int, int]:
    side = int(ckpt["arch"]["resolution"]) // 4
    return (int(ckpt["arch"]["latent_channels"]), side, side)


def _table(keys: list[str], flat: np.ndarray, shape: tuple[int, ...]):
    import pyarrow as pa

    dim = int(np.prod(shape))
    values = pa.array(flat.reshape(-1), type=pa.float32())
    latent = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.Table.from_arrays([pa.array(keys, type=pa.string()), latent], schema=latents_schema(dim, shape))


def describe(summary: EncodeSummary) -> str:
    if not summary.shards_run:
        return f"vae --encode: {summary.shards_total} shard(s) up to date -> {summary.stage}/"
    return (
        f"vae --encode: encoded {summary.latents_written:,} image(s) in {len(summary.shards_run)} shard(s) "
        f"({len(summary.shards_up_to_date)} up to date), latent {list(summary.latent_shape or ())}, "
        f"{summary.seconds:.1f}s -> {summary.stage}/"
    )


# ---------------------------------------------------------------------------------------------------------
# Reading: `trainers ldm` looks latents up by key
# ---------------------------------------------------------------------------------------------------------


class LatentCache:
    """The committed, current latents of one VAE for a cache's embed rows: key -> float32 [C, h, w]."""

    def __init__(self, keys: list[str], latents: np.ndarray, stage: str):
        self.index = {k: i for i, k in enumerate(keys)}
        self.latents = latents  # float32 [N, C, h, w]
        self.stage = stage

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [B], latents float32 [n_found, C, h, w] of the found keys, in order)."""
        pos = np.array([self.index.get(k, -1) for k in keys], dtype=np.int64)
        found = pos >= 0
        return found, self.latents[pos[found]]


def load_latent_cache(cache: Path | str, vae_checkpoint: Path | str) -> LatentCache | None:
    """The latents `encode_latents` committed for this VAE checkpoint file, or None when there are none.
    Shards made from an older embed shard (their deps no longer match) or whose file is missing or
    altered are left out: those images are encoded on the fly. A damaged one (bit rot) is removed too,
    with a warning, so the next `trainers vae --encode` remakes it."""
    import pyarrow as pa

    from manifests.errors import Unreadable
    from pipeline.layout import shard_out
    from trainers.committed import read_parquet_committed

    cache = Path(cache)
    digest = vae_digest(Path(vae_checkpoint))
    stage = latents_stage(digest)
    manifests = list_manifests(cache, stage)
    if not manifests:
        return None
    embed = list_manifests(cache, "embed")
    keys: list[str] = []
    parts: list[np.ndarray] = []
    shape = None
    for shard, manifest in sorted(manifests.items()):
        source = embed.get(shard)
        out = shard_out(manifest, ".parquet")
        if source is None or out is None or manifest.get("params", {}).get("vae_digest") != digest:
            continue
        wanted = {(o["path"], o["digest"]) for o in source.get("outs", [])}
        deps = {(d["name"], d["digest"]) for d in manifest.get("deps", [])}
        if not deps or not deps <= wanted:
            continue  # made from an older embed shard
        try:
            table = read_parquet_committed(cache, out)
            if table is None:
                continue
            this = tuple(json.loads(table.schema.metadata[b"latent_shape"]))
        except (Unreadable, KeyError, TypeError, ValueError):
            _forget_damaged(cache / out["path"], cache, vae_checkpoint)
            continue
        if shape is not None and this != shape:
            continue
        shape = this
        column = table["latent"]
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        values = column.flatten().to_numpy(zero_copy_only=False)  # float32 [n * C * h * w]
        parts.append(values.astype(np.float32, copy=False).reshape((-1, *shape)))
        keys += table["key"].to_pylist()
    if not keys or shape is None:
        return None
    return LatentCache(keys, np.concatenate(parts), stage)


def _forget_damaged(path: Path, cache: Path, vae_checkpoint: Path | str) -> None:
    """Latents are derived: a damaged shard is encoded on the fly instead, and removed so `--encode`
    sees it missing and remakes it (it would pass the size and mtime check otherwise)."""
    import warnings

    try:
        path.unlink(missing_ok=True)
        fix = f"removed; `trainers vae --cache {cache} --encode {vae_checkpoint}` remakes it"
    except OSError as e:
        fix = f"cannot remove it ({e.strerror}); delete it and rerun `trainers vae --encode`"
    warnings.warn(f"{path}: damaged latents, so its images are encoded on the fly; {fix}", stacklevel=3)


def posterior_means(
    vae: torch.nn.Module,
    images: torch.Tensor,
    keys: list[str] | None = None,
    latent_cache: LatentCache | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Unscaled VAE posterior means float32 [B, C, h, w] on `device`: looked up by key in the latent cache
    where it has them, the rest encoded now (no grad) from `images` [B, 3, R, R] in [-1, 1]."""
    device = images.device if device is None else device
    found = cached = None
    if latent_cache is not None and keys is not None:
        found, cached = latent_cache.lookup(list(keys))
        if found.all():
            return torch.from_numpy(cached).to(device, non_blocking=True)
    todo = images if found is None or not found.any() else images[torch.from_numpy(~found)]
    with torch.no_grad():
        mean, _ = vae.encode(todo.to(device, non_blocking=True).float())
    mean = mean.float()
    if found is None or not found.any():
        return mean
    hit = torch.from_numpy(found).to(device)
    out = torch.empty((len(found), *mean.shape[1:]), dtype=mean.dtype, device=device)
    out[hit] = torch.from_numpy(cached).to(device)
    out[~hit] = mean
    return out
