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
metadata (`latent_shape`) and in the manifest. The planning, shard loop and reading are those of every
per-shard derived cache (trainers/derived_shards.py, shared with the token cache).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError, require_at_least
from pipeline.layout import latents_schema
from trainers.derived_shards import (
    ID_HEX,
    DerivedKind,
    KeyedRows,
    ShardEncoder,
    cached_or_computed,
    encode_derived,
    model_digest,
    read_derived,
)

STAGE_ROOT = "latents"
STAGE_VERSION = "1"
KIND = DerivedKind(
    root=STAGE_ROOT,
    version=STAGE_VERSION,
    digest_param="vae_digest",
    column="latent",
    shape_field="latent_shape",
    dtype="float32",
    what="latents",
    command="trainers vae",
)


def vae_digest(checkpoint: Path) -> str:
    """Content digest of a VAE checkpoint file (what the latents are keyed on)."""
    return model_digest(checkpoint)


def latents_stage(digest: str) -> str:
    """`latents/{vae_id}`: the stage (and folder) of one VAE's latents."""
    return KIND.stage(digest)


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
    from trainers.runs import select_device
    from trainers.vae import load_vae

    require_at_least(("--batch-size", batch_size, 1))
    cache = Path(cache)
    if not cache.is_dir():
        raise ConfigError(f"--cache {cache}: no such directory")
    vae, ckpt = load_vae(vae_checkpoint, "--encode")
    digest = vae_digest(Path(ckpt["path"]))
    stage = latents_stage(digest)

    def make_encoder(rows) -> ShardEncoder:
        encode = functools.partial(_posterior_mean, vae.to(select_device(device)))
        extra = {"vae_id": digest[:ID_HEX]}
        return ShardEncoder(rows, encode, _table, _latent_shape(ckpt), KIND.shape_field, extra, batch_size)

    run = encode_derived(
        KIND,
        cache,
        digest,
        params={"vae_digest": digest, "dtype": "float32", "posterior": "mean"},
        unkeyed={"vae_path": ckpt["path"], "vae_step": int(ckpt["step"]), "batch_size": batch_size},
        model_path=ckpt["path"],
        resolution=int(ckpt["arch"]["resolution"]),
        make_encoder=make_encoder,
        progress=progress,
    )
    shape = tuple(run.manifests[-1]["latent_shape"]) if run.manifests else None
    return EncodeSummary(
        stage,
        digest,
        run.shards_total,
        run.shards_run,
        run.shards_up_to_date,
        run.reasons,
        run.rows_written,
        shape,
        run.seconds,
    )


def _posterior_mean(vae: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """images float [B, 3, R, R] in [-1, 1] -> the eval-mode posterior means float32 [B, C, h, w]."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        mean, _ = vae.encode(images.to(device))
    return mean.float().cpu().numpy()


def _latent_shape(ckpt: dict[str, Any]) -> tuple[int, int, int]:
    side = int(ckpt["arch"]["resolution"]) // 4
    return (int(ckpt["arch"]["latent_channels"]), side, side)


def _table(keys: list[str], flat: np.ndarray, shape: tuple[int, ...]):
    import pyarrow as pa

    dim = int(np.prod(shape))
    values = pa.array(flat.astype(np.float32).reshape(-1), type=pa.float32())
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


class LatentCache(KeyedRows):
    """The committed, current latents of one VAE for a cache's embed rows: key -> float32 [C, h, w]."""

    @property
    def latents(self) -> np.ndarray:
        return self.values  # float32 [N, C, h, w]


def load_latent_cache(cache: Path | str, vae_checkpoint: Path | str) -> LatentCache | None:
    """The latents `encode_latents` committed for this VAE checkpoint file, or None when there are none.
    Shards made from an older embed shard (their deps no longer match) or whose file is missing or
    altered are left out: those images are encoded on the fly. A damaged one (bit rot) is removed too,
    with a warning, so the next `trainers vae --encode` remakes it."""
    found = read_derived(KIND, cache, vae_checkpoint)
    if found is None:
        return None
    return LatentCache(found.keys, found.values, latents_stage(vae_digest(Path(vae_checkpoint))))


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

    def encode(todo: torch.Tensor) -> torch.Tensor:
        mean, _ = vae.encode(todo.to(device, non_blocking=True).float())
        return mean.float()

    return cached_or_computed(latent_cache, keys, images, encode, device)
