"""The caption feature bank: every caption feature of a cache's captions step, rows sorted by caption_id,
loaded once per process and keyed by the caption shards' digests. The optimize stage and
`trainers compare --features-only` read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError
from feature_cache.features import fixed_rows, usable_rows
from manifests import Dep


@dataclass
class CaptionBank:
    """Every caption feature of the cache, rows sorted by caption_id, loaded once per process."""

    key: tuple[str, ...]  # the caption shards' output digests
    paths: tuple[Path, ...]
    ids: np.ndarray  # int64 [M], sorted
    emb: np.ndarray  # float16 [M, D], row r is caption ids[r]
    usable: np.ndarray  # bool [M]: finite, non-zero features
    order: np.ndarray  # int64 [M]: row r is row order[r] of the shards concatenated
    _device: dict = field(default_factory=dict)
    _texts: list | None = None
    _parsed: dict = field(default_factory=dict)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of caption ids (any shape); -1 ids (no neighbour) map to -1. Unknown ids: ConfigError."""
        rows = np.searchsorted(self.ids, ids)
        rows_clipped = np.minimum(rows, max(len(self.ids) - 1, 0))
        known = (rows < len(self.ids)) & (self.ids[rows_clipped] == ids) if len(self.ids) else ids < -1
        unknown = ~known & (ids != -1)
        if unknown.any():
            example = int(ids[unknown].flat[0])
            raise ConfigError(
                f"{int(unknown.sum())} nbr_ids (e.g. {example}) are not in the caption features; the "
                "retrieve stage is out of date with captions/: rerun `pipeline retrieve`"
            )
        return np.where(known, rows_clipped, -1)

    def on(self, device) -> tuple[Any, Any]:
        """(features fp16 [M, D], usable bool [M]) as tensors on `device`, cached."""
        import torch

        key = str(device)
        if key not in self._device:
            self._device.clear()
            self._device[key] = (
                torch.from_numpy(self.emb).to(device),
                torch.from_numpy(self.usable).to(device),
            )
        return self._device[key]

    def objects(self, row: int) -> list[dict[str, str]]:
        """Attributes parsed from caption row `row`'s text (synthetic world), cached."""
        if row not in self._parsed:
            from world.attribute_precision import caption_objects

            if self._texts is None:
                import pyarrow.parquet as pq

                texts = [
                    t for p in self.paths for t in pq.read_table(p, columns=["text"])["text"].to_pylist()
                ]
                self._texts = [texts[i] for i in self.order]
            self._parsed[row] = caption_objects(self._texts[row] or "")
        return self._parsed[row]


_BANKS: dict[tuple[str, ...], CaptionBank] = {}


def cached_caption_bank(cache: Path, captions: tuple[Dep, ...], dim: int) -> CaptionBank:
    """One caption bank per process (the last one only), keyed by the caption shards' digests."""
    key = tuple(d.digest for d in captions)
    if key not in _BANKS:
        _BANKS.clear()
        _BANKS[key] = load_caption_bank(cache, captions, dim)
    return _BANKS[key]


def load_caption_bank(cache: Path, captions: tuple[Dep, ...], dim: int) -> CaptionBank:
    import pyarrow.parquet as pq

    paths = tuple(Path(cache) / d.name for d in captions)
    ids, embs = [], []
    for path in paths:
        table = pq.read_table(path, columns=["caption_id", "txt_emb"])
        emb, present = fixed_rows(table["txt_emb"], _caption_dim(table, path, dim), np.float16)
        emb[~present] = 0.0  # null features: never usable
        ids.append(table["caption_id"].to_numpy(zero_copy_only=False).astype(np.int64))
        embs.append(emb)
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    if np.any(sorted_ids[1:] == sorted_ids[:-1]):
        dup = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
        raise ConfigError(f"caption_id {dup} appears twice in captions/*.parquet; rerun `pipeline retrieve`")
    emb = embs[0] if len(embs) == 1 else np.concatenate(embs) if embs else np.zeros((0, dim), np.float16)
    if np.any(order != np.arange(len(order))):  # caption ids usually come sorted: no copy then
        emb = emb[order]
    return CaptionBank(tuple(d.digest for d in captions), paths, sorted_ids, emb, usable_rows(emb), order)


def _caption_dim(table, path: Path, dim: int) -> int:
    found = table.schema.field("txt_emb").type.list_size
    if found not in (-1, dim):
        raise ConfigError(
            f"{path}: caption features have D={found} but the image embeddings D={dim}; the captions were "
            "embedded with another CLIP: rerun `pipeline retrieve`"
        )
    return dim
