"""Stage outputs written directly, with manifests, as the stages would commit them.

`CacheWriter` makes embed sidecars, caption shards and retrieve shards from arrays, without CLIP or
FAISS: the tests of later stages use it to control their inputs exactly, and benchmarks/bench_optimize.py
to build a cache of a million images in seconds. The files have the stages' schemas and each shard is
committed through `manifests.commit_manifest` (outputs first, manifest last), so planning, staleness and
`pipeline status` treat them like real stage outputs. Embed manifests name a placeholder CLIP
("synthetic"); nothing here renders images, so there are no embed tars.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from feature_cache.layout import captions_schema, embed_schema, retrieve_schema, shard_file
from manifests import Dep, ShardSpec, commit_manifest, list_manifests, stat_out, write_parquet_atomic


class CacheWriter:
    """Writes minimal stage outputs plus manifests into `cache`, features of dimension `dim`."""

    def __init__(self, cache: Path | str, dim: int):
        self.cache, self.dim = Path(cache), dim

    def _commit(self, stage: str, shard: int, rel: str, table, deps: list[Dep]) -> str:
        size, digest = write_parquet_atomic(self.cache / rel, table)
        out = stat_out(self.cache, rel, size, digest, table.num_rows)
        params = {"clip_model": "synthetic", "clip_weights": "synthetic"} if stage == "embed" else {}
        unkeyed = {"clip_model_arg": "synthetic", "clip_pretrained_arg": ""} if stage == "embed" else {}
        spec = ShardSpec(stage, shard, "1", params, deps, unkeyed)
        commit_manifest(self.cache, spec, [out], {}, extra={"rows": table.num_rows, "dim": self.dim})
        return digest

    def _features(self, values: np.ndarray, rows: int):
        import pyarrow as pa

        flat = np.asarray(values, np.float16).reshape(rows * self.dim)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), self.dim)

    def embed(
        self, shard: int, keys: list[str], img_emb: np.ndarray, labels: list[str | None] | None = None
    ) -> str:
        """`embed/{shard:05d}.parquet` with these keys, image features and (optional) labels JSON."""
        import pyarrow as pa

        n = len(keys)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "img_emb": self._features(img_emb, n),
                "width": pa.array([64] * n, pa.int32()),
                "height": pa.array([64] * n, pa.int32()),
                "source": pa.array(["synthetic"] * n, pa.string()),
                "caption": pa.array([None] * n, pa.string()),
                "labels": pa.array(labels or [None] * n, pa.string()),
            },
            schema=embed_schema(self.dim),
        )
        rel = shard_file("embed", shard)
        return self._commit("embed", shard, rel, table, [Dep(f"raw{shard}", str(shard))])

    def captions(self, shard: int, ids: np.ndarray, texts: list[str], txt_emb: np.ndarray) -> str:
        """`captions/{shard:05d}.parquet`: caption ids, texts and text features."""
        import pyarrow as pa

        schema = captions_schema(self.dim)
        table = pa.table(
            {
                "caption_id": pa.array(np.asarray(ids, np.int64)),
                "text": pa.array(texts, pa.string()),
                "txt_emb": self._features(txt_emb, len(texts)),
            },
            schema=schema,
        )
        return self._commit("captions", shard, shard_file("captions", shard), table, [Dep("corpus", "c")])

    def retrieve(
        self,
        shard: int,
        keys: list[str],
        nbr_ids: np.ndarray,
        nbr_sims: np.ndarray,
        embed_digest: str | None = None,
    ) -> str:
        """`retrieve/{shard:05d}.parquet`: per key, k neighbour caption ids and similarities [n, k].
        Depends on the committed embed shard (or on `embed_digest`, to fake a stale one)."""
        import pyarrow as pa

        ids, sims = np.asarray(nbr_ids, np.int64), np.asarray(nbr_sims, np.float32)
        if ids.shape != sims.shape or ids.shape[:1] != (len(keys),) or ids.ndim != 2:
            raise ValueError(
                f"nbr_ids and nbr_sims must both be [{len(keys)}, k], got {ids.shape}, {sims.shape}"
            )
        k = ids.shape[1]
        schema = retrieve_schema(k)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "nbr_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k),
                "nbr_sims": pa.FixedSizeListArray.from_arrays(pa.array(sims.reshape(-1)), k),
            },
            schema=schema,
        )
        if embed_digest is None:
            embed_digest = list_manifests(self.cache, "embed")[shard]["outs"][0]["digest"]
        deps = [Dep(shard_file("embed", shard), embed_digest)]
        return self._commit("retrieve", shard, shard_file("retrieve", shard), table, deps)
