"""`trainers dvae --encode`: the dVAE image tokens of every committed embed shard, computed once, shared
by every `trainers dalle` run.

    {cache}/tokens/{dvae_id}/{i:05d}.parquet            key string, tokens fixed_size_list<int16>[h*w]
    {cache}/tokens/{dvae_id}/_manifests/{i:05d}.json    the commit point

`dvae_id` is the first 12 hex digits of the dVAE checkpoint's content digest; each tokens shard is keyed
on the full digest and its embed shard's outputs, so a rerun does nothing when every shard is up to date
(the machinery is the latent cache's: trainers/derived_shards.py). A token row is the hard codes (each
cell's argmax, eval mode) of the image's grid, row-major: exactly `image_tokens` on the fly. The grid
(`[h, w]`) and vocabulary size K are in the Parquet schema metadata (pipeline.layout.tokens_schema) and in
the manifest.

For a transformer over tokens: `load_token_cache(cache, dvae)` -> `TokenCache` (keys, `index` key -> row,
`tokens` int16 [N, h*w], `grid`, `vocab_size`, `dvae_digest`; `lookup(keys)`), or `tokens_for` (cached
where present, else encoded now); `trainers.dvae.decode_tokens(model, tokens)` turns token rows back into
uint8 images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError, require_at_least
from pipeline.layout import tokens_schema
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

STAGE_ROOT = "tokens"
STAGE_VERSION = "1"
KIND = DerivedKind(
    root=STAGE_ROOT,
    version=STAGE_VERSION,
    digest_param="dvae_digest",
    column="tokens",
    shape_field="grid",
    dtype="int16",
    what="tokens",
    command="trainers dvae",
)


def dvae_digest(checkpoint: Path | str) -> str:
    """Content digest of a dVAE checkpoint file (what the tokens are keyed on)."""
    return model_digest(checkpoint)


def tokens_stage(digest: str) -> str:
    """`tokens/{dvae_id}`: the stage (and folder) of one dVAE's tokens."""
    return KIND.stage(digest)


@dataclass
class TokenSummary:
    stage: str  # tokens/{dvae_id}
    dvae_digest: str
    shards_total: int
    shards_run: list[int]
    shards_up_to_date: list[int]
    reasons: dict[int, str] = field(default_factory=dict)  # shard -> why it was (re)made
    images_written: int = 0
    grid: tuple[int, int] = (0, 0)
    vocab_size: int = 0
    seconds: float = 0.0


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
    from trainers.dvae import load_dvae
    from trainers.runs import select_device

    require_at_least(("--batch-size", batch_size, 1))
    cache = Path(cache)
    if not cache.is_dir():
        raise ConfigError(f"--cache {cache}: no such directory")
    model, ckpt = load_dvae(dvae_checkpoint, "--encode")
    digest = dvae_digest(ckpt["path"])
    stage = tokens_stage(digest)
    grid, vocab = tuple(ckpt["arch"]["grid"]), int(ckpt["arch"]["vocab_size"])

    def make_encoder(rows) -> ShardEncoder:
        encode = functools.partial(_hard_codes, model.to(select_device(device)))
        extra = {"vocab_size": vocab, "dvae_id": digest[:ID_HEX]}
        table = functools.partial(_table, vocab_size=vocab)
        return ShardEncoder(rows, encode, table, grid, KIND.shape_field, extra, batch_size)

    run = encode_derived(
        KIND,
        cache,
        digest,
        params={"dvae_digest": digest, "dtype": "int16", "codes": "argmax"},
        unkeyed={"dvae_path": ckpt["path"], "dvae_step": int(ckpt["step"]), "batch_size": batch_size},
        model_path=ckpt["path"],
        resolution=int(ckpt["arch"]["resolution"]),
        make_encoder=make_encoder,
        progress=progress,
    )
    return TokenSummary(
        stage,
        digest,
        run.shards_total,
        run.shards_run,
        run.shards_up_to_date,
        run.reasons,
        run.rows_written,
        grid,
        vocab,
        run.seconds,
    )


def _hard_codes(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """images float [B, 3, R, R] in [-1, 1] -> hard codes int16 [B, h, w]."""
    device = next(model.parameters()).device
    return model.encode_codes(images.to(device)).to(torch.int16).cpu().numpy()


def _table(keys: list[str], flat: np.ndarray, grid: tuple[int, ...], vocab_size: int):
    import pyarrow as pa

    n = int(np.prod(grid))
    values = pa.array(flat.astype(np.int16).reshape(-1), type=pa.int16())
    tokens = pa.FixedSizeListArray.from_arrays(values, n)
    schema = tokens_schema(n, tuple(grid), vocab_size)
    return pa.Table.from_arrays([pa.array(keys, type=pa.string()), tokens], schema=schema)


def describe(summary: TokenSummary) -> str:
    if not summary.shards_run:
        return f"dvae --encode: {summary.shards_total} shard(s) up to date -> {summary.stage}/"
    h, w = summary.grid
    return (
        f"dvae --encode: encoded {summary.images_written:,} image(s) in {len(summary.shards_run)} shard(s) "
        f"({len(summary.shards_up_to_date)} up to date), {h} x {w} tokens of {summary.vocab_size}, "
        f"{summary.seconds:.1f}s -> {summary.stage}/"
    )


# ---------------------------------------------------------------------------------------------------------
# Reading: `trainers dalle` looks tokens up by key
# ---------------------------------------------------------------------------------------------------------


class TokenCache(KeyedRows):
    """The committed, current tokens of one dVAE for a cache's embed rows: key -> int16 [h*w]."""

    def __init__(
        self,
        keys: list[str],
        tokens: np.ndarray,
        stage: str,
        grid: tuple[int, int],
        vocab_size: int,
        digest: str,
    ):
        super().__init__(keys, tokens, stage)
        self.grid = grid  # (h, w): a row is the grid row-major
        self.vocab_size = vocab_size  # K: tokens are in [0, K)
        self.dvae_digest = digest

    @property
    def tokens(self) -> np.ndarray:
        return self.values  # int16 [N, h*w]


def load_token_cache(
    cache: Path | str, dvae_checkpoint: Path | str, flag: str = "--dvae"
) -> TokenCache | None:
    """The tokens `encode_tokens` committed for this dVAE checkpoint (file, or run directory: its latest),
    or None when there are none. Shards made from an older embed shard or by another dVAE, or whose file
    is missing or altered, are left out (their images are encoded on the fly by `tokens_for`); a damaged
    one is removed with a warning, so the next `trainers dvae --encode` remakes it."""
    from trainers.checkpoints import resolve_checkpoint

    path = resolve_checkpoint(dvae_checkpoint, flag)
    found = read_derived(KIND, cache, path)
    if found is None:
        return None
    grid = (int(found.shape[0]), int(found.shape[1]))
    tokens = found.values.reshape(len(found.keys), grid[0] * grid[1])  # [N, h*w]
    digest = dvae_digest(path)
    vocab = int(found.metadata.get("vocab_size", 0))
    return TokenCache(found.keys, tokens, tokens_stage(digest), grid, vocab, digest)


def require_token_cache(cache: Path | str, dvae_checkpoint: Path | str, flag: str = "--dvae") -> TokenCache:
    """`load_token_cache`, or a one-line ConfigError naming `flag` and the `--encode` to run: no tokens
    at all, or only those of another dVAE (another checkpoint, or this path retrained since)."""
    from trainers.checkpoints import resolve_checkpoint

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
