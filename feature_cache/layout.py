"""The cache contract: where a stage keeps shard i's files, relative to the cache, and each stage table's
Parquet schema (the stages write with it; `feature_cache.writer` writes test caches with it too).

    {cache}/{stage}/{i:05d}.parquet        every stage's table (embed also has {i:05d}.tar)
    {cache}/{stage}/_manifests/{i:05d}.json, _stats/{i:05d}.json    (manifests/manifest.py)

Stages, the trainers and the test writers name shard files through `shard_file`, and read a committed one
through its manifest (`feature_cache.committed`); the steps that exist are in feature_cache/steps.py.
"""

from __future__ import annotations

from typing import Any


def shard_file(stage: str, shard: int, ext: str = "parquet") -> str:
    """`embed/00003.parquet`: shard `shard`'s file of `stage` (a folder such as `optimize-mix` or
    `latents/{vae_id}` too), relative to the cache."""
    return f"{stage}/{shard:05d}.{ext}"


def shard_out(manifest: dict[str, Any], suffix: str = ".parquet") -> dict[str, Any] | None:
    """The `outs` record (path, size, digest, rows) of a shard manifest's file ending in `suffix`."""
    return next((o for o in manifest.get("outs", []) if o["path"].endswith(suffix)), None)


def embed_schema(dim: int):
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("img_emb", pa.list_(pa.float16(), dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("source", pa.string()),
            ("caption", pa.string()),
            ("labels", pa.string()),  # JSON metadata carried from the source (nullable)
        ]
    )


def captions_schema(dim: int):
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("caption_id", pa.int64(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("txt_emb", pa.list_(pa.float16(), dim), nullable=False),
        ]
    )


def retrieve_schema(k: int):
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("nbr_ids", pa.list_(pa.int64(), k), nullable=False),  # caption_ids, best first
            pa.field("nbr_sims", pa.list_(pa.float32(), k), nullable=False),  # inner products (cosines)
        ]
    )


def optimize_schema(dim: int):
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("pseudo_txt", pa.list_(pa.float16(), dim)),
            ("cos_init", pa.float32()),
            ("cos_final", pa.float32()),
            ("method", pa.string()),
        ]
    )


def latents_schema(dim: int, shape: tuple[int, ...]):
    """`latents/{vae_id}/` (trainers vae --encode): a VAE's posterior means, flattened, with their shape."""
    import json

    import pyarrow as pa

    return pa.schema(
        [pa.field("key", pa.string(), nullable=False), pa.field("latent", pa.list_(pa.float32(), dim))],
        metadata={"latent_shape": json.dumps(list(shape)), "dtype": "float32"},
    )


def tokens_schema(n_tokens: int, grid: tuple[int, int], vocab_size: int):
    """`tokens/{dvae_id}/` (trainers dvae --encode): a dVAE's hard codes, the grid flattened row-major,
    with the grid shape and the vocabulary size (codes are in [0, vocab_size))."""
    import json

    import pyarrow as pa

    return pa.schema(
        [pa.field("key", pa.string(), nullable=False), pa.field("tokens", pa.list_(pa.int16(), n_tokens))],
        metadata={"grid": json.dumps(list(grid)), "vocab_size": str(int(vocab_size)), "dtype": "int16"},
    )
