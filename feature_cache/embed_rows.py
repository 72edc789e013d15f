"""The embed stage as the trainers see it: every committed row (key, image feature, caption, labels) and
random access to its image, plus which CLIP made the cache.

A shard whose files do not match its manifest is skipped (and named); a damaged one is `Unreadable`; keys
that appear in two shards are refused (inputs whose keys collided before embed checked them).
"""

from __future__ import annotations

import json
import os
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError
from feature_cache.committed import (
    PartialCache,
    _describe,
    open_committed,
    raise_fd_limit,
    read_parquet_committed,
)
from feature_cache.features import fixed_rows
from feature_cache.layout import shard_out
from feature_cache.tar_images import TarImages, index_tar
from manifests import digest_json, list_manifests
from manifests.errors import damaged

if TYPE_CHECKING:
    import torch

    from feature_cache.clip_record import EmbeddedClip


def cache_clip(cache: Path) -> EmbeddedClip:
    """Which CLIP made the cache (model/weights args, identity, dim); ConfigError without embed."""
    from feature_cache.clip_record import embedded_clip

    cache = Path(cache)
    if not cache.is_dir():
        raise ConfigError(
            f"--cache {cache}: no such directory; make one with `pipeline embed INPUT... --cache`"
        )
    return embedded_clip(cache)


def feature_dim(cache: Path) -> int:
    return int(cache_clip(cache).dim)


@dataclass
class EmbedRows:
    """Every committed embed row, concatenated in (shard, row) order, with random access to its image."""

    cache: Path
    clip: EmbeddedClip
    shards: list[int]  # committed, intact shards read
    parquet_outs: dict[int, dict[str, Any]]  # shard -> the sidecar's manifest `out` (path, size, digest)
    keys: list[str]
    shard_of: np.ndarray  # int32 [N]
    img_emb: np.ndarray  # float16 [N, D]
    captions: list[str | None]
    labels: list[str | None]  # JSON strings (the source's json), or None
    offsets: np.ndarray  # int64 [N]: image member data offset in the shard's tar
    sizes: np.ndarray  # int64 [N]
    images: TarImages
    skipped_shards: dict[int, str] = field(default_factory=dict)  # shard -> why it was not read

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def image_size(self) -> int:
        return self.images.image_size

    def image(self, row: int) -> torch.Tensor:
        """uint8 [3, S, S] of row `row`."""
        shard = int(self.shard_of[row])
        data = self.images.read(shard, int(self.offsets[row]), int(self.sizes[row]))
        tar = self.cache / self.images.tar_outs[shard]["path"]
        return self.images.decode(data, f"{tar} (the image of key {self.keys[row]!r})")

    def pixels(self, rows) -> torch.Tensor:
        """uint8 [B, 3, S, S] of several rows."""
        import torch

        return torch.stack([self.image(int(r)) for r in rows])

    def digest(self) -> str:
        """Identity of exactly these rows: the sidecars' output digests and the CLIP identity."""
        return digest_json(
            {
                "embed": [
                    [self.parquet_outs[s]["path"], self.parquet_outs[s]["digest"]] for s in self.shards
                ],
                "clip": self.clip.identity,
            }
        )


def read_embed(cache: Path, warn: bool = True) -> EmbedRows:
    """The committed embed rows of a cache. Shards whose files do not match their manifest are skipped
    (listed in `skipped_shards`, and warned about unless `warn` is False); none readable is a ConfigError
    naming `pipeline embed` (a `PartialCache` when some were skipped). A damaged shard is `Unreadable`."""
    cache = Path(cache)
    clip = cache_clip(cache)
    manifests = list_manifests(cache, "embed")
    raise_fd_limit(len(manifests) + 256)
    shards, parquet_outs, tar_outs, fds, skipped = [], {}, {}, {}, {}
    keys: list[str] = []
    parts: dict[str, list] = {"shard_of": [], "img_emb": [], "offsets": [], "sizes": []}
    captions: list[str | None] = []
    labels: list[str | None] = []
    stored_sizes = set()
    for shard, manifest in sorted(manifests.items()):
        p_out, t_out = shard_out(manifest, ".parquet"), shard_out(manifest, ".tar")
        if p_out is None or t_out is None:
            skipped[shard] = "manifest lists no tar or no sidecar"
            continue
        fd = open_committed(cache, t_out)
        try:
            table = read_parquet_committed(cache, p_out) if fd is not None else None
            shard_keys = table["key"].to_pylist() if table is not None else []
            found = _image_members(cache, t_out, fd, shard_keys) if table is not None else []
        except BaseException:  # a damaged shard: hold no descriptors
            for held in [fd, *fds.values()] if fd is not None else fds.values():
                os.close(held)
            raise
        if fd is None or table is None:
            if fd is not None:
                os.close(fd)
            skipped[shard] = "files missing or being rewritten (size differs from the manifest)"
            continue
        parts["offsets"].append(np.array([m[0] for m in found], dtype=np.int64))
        parts["sizes"].append(np.array([m[1] for m in found], dtype=np.int64))
        parts["shard_of"].append(np.full(len(shard_keys), shard, dtype=np.int32))
        parts["img_emb"].append(fixed_rows(table["img_emb"], clip.dim, np.float16, "nan")[0])
        keys += shard_keys
        captions += (
            table["caption"].to_pylist() if "caption" in table.column_names else [None] * len(shard_keys)
        )
        labels += table["labels"].to_pylist() if "labels" in table.column_names else [None] * len(shard_keys)
        shards.append(shard)
        parquet_outs[shard], tar_outs[shard], fds[shard] = p_out, t_out, fd
        stored_sizes.add(int(manifest.get("params", {}).get("image_size", 0)))
    if not shards:
        if skipped:
            raise PartialCache(cache, {"embed": skipped}, rest=False)
        raise ConfigError(
            f"--cache {cache}: no committed embed shard could be read; run `pipeline embed INPUT... "
            f"--cache {cache}`"
        )
    if skipped and warn:
        warnings.warn(
            f"--cache {cache}: skipped {len(skipped)} embed shard(s): {_describe(skipped)}", stacklevel=2
        )
    if len(set(keys)) != len(keys):
        twice = next(k for k, n in Counter(keys).items() if n > 1)
        raise ConfigError(
            f"--cache {cache}: key {twice!r} appears in two embed shards (inputs whose keys collide, "
            "embedded before embed refused them); rebuild the cache with `pipeline embed INPUT... "
            "--key-prefix input --force` so every key is prefixed with its input folder's name"
        )
    image_size = stored_sizes.pop() if len(stored_sizes) == 1 else 0
    return EmbedRows(
        cache=cache,
        clip=clip,
        shards=shards,
        parquet_outs=parquet_outs,
        keys=keys,
        shard_of=np.concatenate(parts["shard_of"]),
        img_emb=np.concatenate(parts["img_emb"]),
        captions=captions,
        labels=labels,
        offsets=np.concatenate(parts["offsets"]),
        sizes=np.concatenate(parts["sizes"]),
        images=TarImages(cache, tar_outs, fds, image_size),
        skipped_shards=skipped,
    )


def _image_members(
    cache: Path, t_out: dict[str, Any], fd: int, keys: list[str]
) -> list[tuple[int, int, str]]:
    """(offset, size, ext) of each sidecar key's image in the shard's tar. Embed stores one for every row,
    so a tar that does not parse, or a key without its image (a damaged header), is `damaged`."""
    path = Path(cache) / t_out["path"]
    try:
        members = index_tar(fd)
    except (tarfile.TarError, ValueError, OSError) as e:
        raise damaged(path, e, cache) from None
    found = [members.get(k) for k in keys]
    lost = [k for k, m in zip(keys, found, strict=True) if m is None]
    if lost:
        raise damaged(
            path, ValueError(f"{len(lost)} of its {len(keys)} images are missing, e.g. {lost[0]!r}"), cache
        )
    return found


def cache_image_size(cache: Path) -> int:
    """The stored image side of a cache (what generators are trained at)."""
    rows = read_embed(cache)
    try:
        if rows.image_size == 0:
            rows.image(0)
        return rows.image_size
    finally:
        rows.images.close()


def labels_of(rows: EmbedRows, row: int) -> dict[str, Any] | None:
    """The source's json of an embed row (the synthetic world's labels), parsed; None if absent or bad."""
    raw = rows.labels[row]
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
