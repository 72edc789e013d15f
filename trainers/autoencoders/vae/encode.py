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
metadata (`latent_shape`) and in the manifest. The planning, shard loop, summary and reading are those of
every per-shard derived cache (trainers/data/derived.py, shared with the token cache); what is particular
to latents is the `CODEC` below. `trainers ldm` reads them through a store derived once per cache state
(trainers/data/derived_store.py), one `pread` per key and per latent, so its memory does not grow with the
cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from feature_cache.layout import latents_schema
from trainers.data.derived import (
    Codec,
    DerivedCache,
    DerivedKind,
    EncodeSummary,
    cached_or_computed,
    encode_cache,
    model_digest,
)
from trainers.data.derived import describe as describe  # what `trainers vae --encode` prints

STAGE_ROOT = "latents"
STAGE_VERSION = "1"
KIND = DerivedKind(
    root=STAGE_ROOT,
    version=STAGE_VERSION,
    model="vae",
    column="latent",
    shape_field="latent_shape",
    dtype="float32",
    what="latents",
    params=(("dtype", "float32"), ("posterior", "mean")),
)


def vae_digest(checkpoint: Path) -> str:
    """Content digest of a VAE checkpoint file (what the latents are keyed on)."""
    return model_digest(checkpoint)


def latents_stage(digest: str) -> str:
    """`latents/{vae_id}`: the stage (and folder) of one VAE's latents."""
    return KIND.stage(digest)


class LatentSummary(EncodeSummary):
    """What `encode_latents` did (stage latents/{vae_id})."""

    @property
    def vae_digest(self) -> str:
        return self.digest

    @property
    def latents_written(self) -> int:
        return self.rows_written

    @property
    def latent_shape(self) -> tuple[int, ...] | None:
        return self.made

    def made_text(self) -> str:
        return f"latent {list(self.latent_shape or ())}"


def encode_latents(
    cache: Path | str,
    vae_checkpoint: Path | str,
    batch_size: int = 64,
    device: str = "auto",
    progress: Any = None,
) -> LatentSummary:
    """Encode every committed embed shard whose latents are missing or stale; returns what was done.

    `vae_checkpoint`: a `trainers vae` checkpoint file or run directory (its latest checkpoint).
    `progress(n)` is called with the images just encoded."""
    return encode_cache(KIND, CODEC, cache, vae_checkpoint, batch_size, device, progress)


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


CODEC = Codec(
    "trainers.autoencoders.vae.model:load_vae",
    _posterior_mean,
    _table,
    _latent_shape,
    extra=lambda ckpt: {},
    summary=LatentSummary,
)


# ---------------------------------------------------------------------------------------------------------
# Reading: `trainers ldm` looks latents up by key
# ---------------------------------------------------------------------------------------------------------


class LatentCache(DerivedCache):
    """The committed, current latents of one VAE for a cache's embed rows: key -> float32 [C, h, w]."""

    @property
    def latents(self):
        return self.values  # float32 [N, C, h, w], read per request (a numpy array when held in memory)


def load_latent_cache(cache: Path | str, vae_checkpoint: Path | str) -> LatentCache | None:
    """The latents `encode_latents` committed for this VAE checkpoint file, or None when there are none.
    Shards made from an older embed shard (their deps no longer match) or whose file is missing or
    altered are left out: those images are encoded on the fly. A damaged one (bit rot) is removed too,
    with a warning, so the next `trainers vae --encode` remakes it. Read through the store of this cache
    state (trainers/data/derived_store.py), derived first if there is none."""
    from trainers.data.derived_store import load_derived

    rows = load_derived(KIND, cache, vae_checkpoint)
    return None if rows is None else LatentCache(rows)


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
