"""Reading the optimize stage's inputs: embed sidecars, retrieve shards and the caption feature bank.

Bad rows are set aside and counted by reason (`ShardRows.dropped`); inputs that cannot be right (keys
unknown to the embed shard, caption ids missing from captions/, features of the wrong dimension) raise
a one-line `ConfigError` that names the stage to rerun. The caption bank is loaded once per process.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.errors import ConfigError
from feature_cache.caption_bank import CaptionBank
from feature_cache.features import fixed_rows, padded_lists

if TYPE_CHECKING:
    from pipeline.optimize.stage import ShardInputs


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
    from world.attribute_precision import target_object

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
