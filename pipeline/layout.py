"""The cache contract's paths: where a stage keeps shard i's files, relative to the cache.

    {cache}/{stage}/{i:05d}.parquet        every stage's table (embed also has {i:05d}.tar)
    {cache}/{stage}/_manifests/{i:05d}.json, _stats/{i:05d}.json    (manifests/manifest.py)

Stages, the trainers and the test writers name shard files through `shard_file`, and read a committed one
through its manifest (`trainers.committed`); the stages that exist are in pipeline/dag.py.
"""

from __future__ import annotations


def shard_file(stage: str, shard: int, ext: str = "parquet") -> str:
    """`embed/00003.parquet`: shard `shard`'s file of `stage` (a folder such as `optimize-mix` or
    `latents/{vae_id}` too), relative to the cache."""
    return f"{stage}/{shard:05d}.{ext}"
