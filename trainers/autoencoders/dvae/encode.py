"""`trainers dvae --encode`: the dVAE image tokens of every committed embed shard, computed once, shared
by every `trainers dalle` run.

    {cache}/tokens/{dvae_id}/{i:05d}.parquet            key string, tokens fixed_size_list<int16>[h*w]
    {cache}/tokens/{dvae_id}/_manifests/{i:05d}.json    the commit point

`dvae_id` is the first 12 hex digits of the dVAE checkpoint's content digest; each tokens shard is keyed
on the full digest and its embed shard's outputs, so a rerun does nothing when every shard is up to date
(the machinery is the latent cache's: trainers/data/derived.py). A token row is the hard codes (each
cell's argmax, eval mode) of the image's grid, row-major: exactly `image_tokens` on the fly. The grid
(`[h, w]`) and vocabulary size K are in the Parquet schema metadata (feature_cache.layout.tokens_schema) and
in the manifest.

For a transformer over tokens: `load_token_cache(cache, dvae)` -> `TokenCache` (`lookup(keys)`, `grid`,
`vocab_size`, `dvae_digest`; `keys`, `index` key -> position and `tokens` int16 [N, h*w] in that order,
read per request), or `tokens_for` (cached where present, else encoded now);
`trainers.autoencoders.dvae.model.decode_tokens(model, tokens)` turns token rows back into uint8 images. The
cache is read through a store derived once per cache state (trainers/data/derived_store.py), one `pread` per
key and per token row, so a run's memory does not grow with the cache; what is particular to tokens is the
`CODEC`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError
from feature_cache.layout import tokens_schema
from trainers.data.derived import (
    Codec,
    DerivedCache,
    DerivedKind,
    EncodeSummary,
    cached_or_computed,
    encode_cache,
    model_digest,
)
from trainers.data.derived import describe as describe  # what `trainers dvae --encode` prints

STAGE_ROOT = "tokens"
STAGE_VERSION = "1"
KIND = DerivedKind(
    root=STAGE_ROOT,
    version=STAGE_VERSION,
    model="dvae",
    column="tokens",
    shape_field="grid",
    dtype="int16",
    what="tokens",
    params=(("dtype", "int16"), ("codes", "argmax")),
    flat_rows=True,  # a token row is the grid row-major: int16 [h*w]
)


def dvae_digest(checkpoint: Path | str) -> str:
    """Content digest of a dVAE checkpoint file (what the tokens are keyed on)."""
    return model_digest(checkpoint)


def tokens_stage(digest: str) -> str:
    """`tokens/{dvae_id}`: the stage (and folder) of one dVAE's tokens."""
    return KIND.stage(digest)


class TokenSummary(EncodeSummary):
    """What `encode_tokens` did (stage tokens/{dvae_id})."""

    @property
    def dvae_digest(self) -> str:
        return self.digest

    @property
    def images_written(self) -> int:
        return self.rows_written

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.shape)

    @property
    def vocab_size(self) -> int:
        return int(self.extra["vocab_size"])

    def made_text(self) -> str:
        h, w = self.grid
        return f"{h} x {w} tokens of {self.vocab_size}"


def encode_tokens(
    cache: Path | str,
    dvae_checkpoint: Path | str,
    batch_size: int = 64,
    device: str = "auto",
    progress: Any = None,
) -> TokenSummary:
    """Encode every committed embed shard whose tokens are missing or stale; returns what was done.

    `dvae_checkpoint`: a `trainers dvae` checkpoint file or run directory (its latest checkpoint).
    `progress(n)` is called with the images just encoded."""
    return encode_cache(KIND, CODEC, cache, dvae_checkpoint, batch_size, device, progress)


def _hard_codes(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """images float [B, 3, R, R] in [-1, 1] -> hard codes int16 [B, h, w]."""
    device = next(model.parameters()).device
    return model.encode_codes(images.to(device)).to(torch.int16).cpu().numpy()


def _grid(ckpt: dict[str, Any]) -> tuple[int, ...]:
    return tuple(ckpt["arch"]["grid"])


def _vocab(ckpt: dict[str, Any]) -> dict[str, Any]:
    return {"vocab_size": int(ckpt["arch"]["vocab_size"])}


def _table(keys: list[str], flat: np.ndarray, grid: tuple[int, ...], vocab_size: int):
    import pyarrow as pa

    n = int(np.prod(grid))
    values = pa.array(flat.astype(np.int16).reshape(-1), type=pa.int16())
    tokens = pa.FixedSizeListArray.from_arrays(values, n)
    schema = tokens_schema(n, tuple(grid), vocab_size)
    return pa.Table.from_arrays([pa.array(keys, type=pa.string()), tokens], schema=schema)


CODEC = Codec(
    "trainers.autoencoders.dvae.model:load_dvae", _hard_codes, _table, _grid, _vocab, summary=TokenSummary
)


# ---------------------------------------------------------------------------------------------------------
# Reading: `trainers dalle` looks tokens up by key
# ---------------------------------------------------------------------------------------------------------


class TokenCache(DerivedCache):
    """The committed, current tokens of one dVAE for a cache's embed rows: key -> int16 [h*w]. `rows`: a
    `derived_store.StoredRows` (read per batch) or a `derived_shards.KeyedRows` (in memory)."""

    def __init__(self, rows: Any, grid: tuple[int, int], vocab_size: int, digest: str):
        super().__init__(rows)
        self.grid = grid  # (h, w): a row is the grid row-major
        self.vocab_size = vocab_size  # K: tokens are in [0, K)
        self.dvae_digest = digest

    @property
    def tokens(self):
        return self.values  # int16 [N, h*w], read per request (a numpy array when held in memory)


def load_token_cache(
    cache: Path | str, dvae_checkpoint: Path | str, flag: str = "--dvae"
) -> TokenCache | None:
    """The tokens `encode_tokens` committed for this dVAE checkpoint (file, or run directory: its latest),
    or None when there are none. Shards made from an older embed shard or by another dVAE, or whose file
    is missing or altered, are left out (their images are encoded on the fly by `tokens_for`); a damaged
    one is removed with a warning, so the next `trainers dvae --encode` remakes it. Read through the store
    of this cache state (trainers/data/derived_store.py), derived first if there is none."""
    from trainers.data.derived_store import load_derived
    from trainers.runtime.checkpoints import resolve_checkpoint

    path = resolve_checkpoint(dvae_checkpoint, flag)
    rows = load_derived(KIND, cache, path)
    if rows is None:
        return None
    grid = (int(rows.shape[0]), int(rows.shape[1]))
    vocab = int(rows.metadata.get("vocab_size", 0))
    return TokenCache(rows, grid, vocab, dvae_digest(path))


def require_token_cache(cache: Path | str, dvae_checkpoint: Path | str, flag: str = "--dvae") -> TokenCache:
    """`load_token_cache`, or a one-line ConfigError naming `flag` and the `--encode` to run: no tokens
    at all, or only those of another dVAE (another checkpoint, or this path retrained since)."""
    from trainers.runtime.checkpoints import resolve_checkpoint

    found = load_token_cache(cache, dvae_checkpoint, flag)
    if found is not None:
        return found
    path = resolve_checkpoint(dvae_checkpoint, flag)
    ours = tokens_stage(dvae_digest(path))
    others = sorted(
        p.parent.relative_to(cache).as_posix()
        for p in Path(cache).glob(f"{STAGE_ROOT}/*/_manifests")
        if p.parent.relative_to(cache).as_posix() != ours and any(p.glob("*.json"))
    )
    fix = f"run `trainers dvae --cache {cache} --encode {path}`"
    if others:
        raise ConfigError(
            f"{flag} {path}: the cache's tokens ({', '.join(o + '/' for o in others)}) were made by another "
            f"dVAE, none by this one ({ours}/); {fix}"
        )
    raise ConfigError(f"{flag} {path}: the cache has no tokens of this dVAE ({ours}/); {fix}")


def image_tokens(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """Tokens on the fly: images uint8 [B, 3, R, R] (or float in [-1, 1], as the loader gives) -> hard
    codes int64 [B, h*w] on `device` (default: the model's), the numbers the token cache stores."""
    model_device = next(model.parameters()).device
    x = images.to(model_device)
    x = x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x.float()
    return model.encode_codes(x).flatten(1).to(device or model_device)  # [B, h*w]


def tokens_for(
    model: torch.nn.Module,
    images: torch.Tensor,
    keys: list[str] | None = None,
    token_cache: TokenCache | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """int64 [B, h*w] on `device`: looked up by key in the token cache where it has them, the rest
    encoded now from `images` (uint8, or float in [-1, 1])."""
    device = images.device if device is None else device
    return cached_or_computed(
        token_cache, keys, images, lambda todo: image_tokens(model, todo, device), device, torch.long
    )
