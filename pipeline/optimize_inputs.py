"""Reading the optimize stage's inputs: embed sidecars, retrieve shards and the caption feature bank.

Bad rows are set aside and counted by reason (`ShardRows.dropped`); inputs that cannot be right (keys
unknown to the embed shard, caption ids missing from captions/, features of the wrong dimension) raise
a one-line `ConfigError` that names the stage to rerun. The caption bank is loaded once per process.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from manifests import Dep
from pipeline.errors import ConfigError
from pipeline.features import fixed_rows, padded_lists, usable_rows

if TYPE_CHECKING:
    from pipeline.optimize import ShardInputs


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
            from pipeline.attribute_precision import caption_objects

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


def read_retrieve(path: Path, keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours aligned to the embed rows `keys`: ids int64 [N, K] (-1: none), sims float32 [N, K], and
    a bool [N] of rows that have a retrieve row. Keys unknown to embed mean a stale shard: ConfigError."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["key", "nbr_ids", "nbr_sims"])
    r_keys = table["key"].to_pylist()
    ids = padded_lists(table["nbr_ids"], -1, np.int64)
    sims = padded_lists(table["nbr_sims"], np.nan, np.float32)
    k = max(ids.shape[1], sims.shape[1])
    ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
    sims = np.pad(sims, ((0, 0), (0, k - sims.shape[1])), constant_values=np.nan)
    if r_keys == keys:
        return ids, sims, np.ones(len(keys), dtype=bool)
    position = {key: i for i, key in enumerate(keys)}
    stray = [key for key in r_keys if key not in position]
    if stray or len(set(r_keys)) != len(r_keys):
        raise ConfigError(
            f"{path}: keys do not match the embed shard (e.g. {(stray or r_keys)[0]!r}); "
            "rerun `pipeline retrieve`"
        )
    rows = np.array([position[key] for key in r_keys], dtype=np.int64)
    out_ids = np.full((len(keys), k), -1, dtype=np.int64)
    out_sims = np.full((len(keys), k), np.nan, dtype=np.float32)
    out_ids[rows], out_sims[rows] = ids, sims
    has = np.zeros(len(keys), dtype=bool)
    has[rows] = True
    return out_ids, out_sims, has


def first_objects(labels: list[str | None]) -> list[dict[str, str] | None]:
    """The attribute-precision target of each image's labels JSON (its first object), or None."""
    from pipeline.attribute_precision import target_object

    return [target_object(text) for text in labels]


@dataclass
class ShardRows:
    """What one shard's inputs hold, after bad rows are set aside (counted in `dropped`)."""

    keys: list[str]  # every embed row's key, in sidecar order
    keep: np.ndarray  # int64 [n]: the embed rows used, in order
    f: np.ndarray  # float32 [n, D]: their image features, renormalised
    dropped: Counter  # reason -> rows
    truths: list[dict[str, str] | None]  # per kept row: the first object of its labels (synthetic world)
    nbr_rows: np.ndarray | None = None  # int64 [n, K]: caption bank rows (0 where not valid)
    nbr_sims: np.ndarray | None = None  # float32 [n, K] (0 where not valid)
    nbr_valid: np.ndarray | None = None  # bool [n, K]


def read_shard_rows(cache: Path, inputs: ShardInputs, dim: int, bank: CaptionBank | None) -> ShardRows:
    """Read the embed sidecar (and the retrieve shard when `bank` is given); skip and count bad rows."""
    import pyarrow.parquet as pq

    embed = pq.read_table(cache / inputs.embed)
    keys = embed["key"].to_pylist()
    img_emb, present = fixed_rows(embed["img_emb"], dim)
    drop = np.full(len(keys), "", dtype=object)
    norms = np.linalg.norm(img_emb, axis=1)
    drop[~np.isfinite(norms)] = "non_finite_img_emb"
    drop[np.isfinite(norms) & (norms < 1e-6)] = "zero_img_emb"
    drop[~present] = "missing_img_emb"
    if bank is not None:
        nbr_ids, nbr_sims, has_row = read_retrieve(cache / inputs.retrieve, keys)
        nbr_rows = bank.rows_of(nbr_ids)  # [N, K], -1 where no neighbour; unknown ids raise
        valid = (nbr_rows >= 0) & np.isfinite(nbr_sims)
        valid[valid] = bank.usable[nbr_rows[valid]]
        ok = drop == ""
        drop[ok & ~valid.any(axis=1)] = "no_usable_neighbours"
        drop[ok & ~has_row] = "no_retrieve_row"
    keep = np.flatnonzero(drop == "")
    labels = embed["labels"].to_pylist() if "labels" in embed.column_names else [None] * len(keys)
    rows = ShardRows(
        keys=keys,
        keep=keep,
        f=np.ascontiguousarray(img_emb[keep] / norms[keep, None], dtype=np.float32),
        dropped=Counter(r for r in drop.tolist() if r),
        truths=first_objects([labels[i] for i in keep]),
    )
    if bank is not None:
        rows.nbr_valid = valid[keep]
        rows.nbr_rows = np.where(rows.nbr_valid, nbr_rows[keep], 0)
        rows.nbr_sims = np.where(rows.nbr_valid, nbr_sims[keep], 0.0).astype(np.float32)
    return rows
