"""Caches derived per embed shard by a frozen model: latents (`trainers vae --encode`, trainers/latents.py)
and image tokens (`trainers dvae --encode`, trainers/tokens.py).

    {cache}/{root}/{model_id}/{i:05d}.parquet           key string + one fixed-size list column
    {cache}/{root}/{model_id}/_manifests/{i:05d}.json   the commit point (manifests.commit_manifest)

`model_id` is the first 12 hex digits of the model checkpoint's content digest, so two models never share
a folder. Derived shard i comes from embed shard i; its key hashes the full model digest and the embed
shard's tar and Parquet output digests, so a rerun does nothing when every shard is up to date and a new
(or remade) embed shard is encoded alone. What differs between the caches is a `DerivedKind` (names) and
the `ShardEncoder`'s two functions (images -> values, values -> table).

Reading (`read_derived`) keeps only shards made by this model from the current embed shards; a damaged
one is removed with a warning (the next `--encode` remakes it) and its images are encoded on the fly:
`cached_or_computed` mixes the cached rows of a batch with freshly computed ones.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manifests import (
    Dep,
    ShardSpec,
    check_shard,
    commit_manifest,
    digest_file_content,
    list_manifests,
    stat_out,
    write_parquet_atomic,
)
from pipeline.errors import ConfigError
from pipeline.layout import shard_file
from pipeline.stage import run_shards

ID_HEX = 12


@dataclass(frozen=True)
class DerivedKind:
    root: str  # top folder under the cache: latents, tokens
    version: str  # stage code version: bumping it remakes every shard
    digest_param: str  # the manifest params field holding the model's digest: vae_digest, dvae_digest
    column: str  # the Parquet fixed-size list column: latent, tokens
    shape_field: str  # the item shape's name in the schema metadata and the manifest: latent_shape, grid
    dtype: str  # numpy dtype of the column's values
    what: str  # in messages: latents, tokens
    command: str  # the command whose --encode makes them: trainers vae, trainers dvae

    def stage(self, digest: str) -> str:
        """`{root}/{model_id}`: the stage (and folder) of one model's outputs."""
        return f"{self.root}/{digest[:ID_HEX]}"


def model_digest(checkpoint: Path | str) -> str:
    """Content digest of a model checkpoint file (what a derived cache is keyed on)."""
    return digest_file_content(Path(checkpoint))


def embed_deps(rows, shard: int) -> list[Dep]:
    """The embed shard's committed outputs (sidecar Parquet and tar), by digest."""
    outs = [rows.parquet_outs[shard], rows.images.tar_outs[shard]]
    return [Dep(o["path"], o["digest"]) for o in outs]


@dataclass
class DerivedRun:
    stage: str
    shards_total: int
    shards_run: list[int] = field(default_factory=list)
    shards_up_to_date: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)  # shard -> why it was (re)made
    rows_written: int = 0
    manifests: list[dict[str, Any]] = field(default_factory=list)  # of the shards made
    seconds: float = 0.0


@dataclass(frozen=True)
class EncodeTask:
    spec: ShardSpec  # the derived shard to make, keyed on the model and its embed shard


def encode_derived(
    kind: DerivedKind,
    cache: Path,
    digest: str,
    params: dict[str, Any],
    unkeyed: dict[str, Any],
    model_path: str,
    resolution: int,
    make_encoder: Callable[[Any], Callable],
    progress: Any = None,
) -> DerivedRun:
    """Make every shard of `kind.stage(digest)` (digest: the model checkpoint's content) whose embed
    shard is committed and whose output is missing or stale. `params` are keyed (with the embed
    outputs), `unkeyed` only recorded; the model was trained on `resolution` px images (`model_path`
    names it in the error when the cache's differ). `make_encoder(rows)` returns the shard function (a
    `ShardEncoder`); it is called only when there is work, so a model moves to its device only then."""
    from trainers.embed_rows import read_embed

    t0, stage = time.perf_counter(), kind.stage(digest)
    cache = Path(cache)
    if not cache.is_dir():
        raise ConfigError(f"--cache {cache}: no such directory")
    rows = read_embed(cache)
    try:
        if rows.image_size and rows.image_size != resolution:
            raise ConfigError(
                f"--encode {model_path}: trained on {resolution}px images, the cache has "
                f"{rows.image_size}px ones"
            )
        todo, run = [], DerivedRun(stage, len(rows.shards))
        for shard in rows.shards:
            spec = ShardSpec(stage, shard, kind.version, params, embed_deps(rows, shard), unkeyed)
            reason = check_shard(cache, spec)
            if reason is None:
                run.shards_up_to_date.append(shard)
            else:
                todo.append(spec)
                run.reasons[shard] = reason
        if todo:
            tasks = [EncodeTask(spec) for spec in todo]
            made = run_shards(cache, stage, tasks, make_encoder(rows), progress=progress)
            run.shards_run, run.rows_written, run.manifests = made.shards_run, made.rows, made.manifests
        run.seconds = time.perf_counter() - t0
        return run
    finally:
        rows.images.close()


@dataclass
class ShardEncoder:
    """Makes one derived shard (`pipeline.stage.run_shards`' `fn`): `encode` of its embed shard's images,
    in sidecar order, as `table`, written and committed. Its manifest records the rows, the item shape
    (as `shape_field`) and `extra`."""

    rows: Any  # trainers.embed_rows.EmbedRows
    encode: Callable[[torch.Tensor], np.ndarray]  # images float [B, 3, R, R] in [-1, 1] -> [B, *shape]
    table: Callable[[list[str], np.ndarray, tuple[int, ...]], Any]  # keys, values [n, prod(shape)], shape
    item_shape: tuple[int, ...]  # an item's shape (what an empty shard records)
    shape_field: str
    extra: dict[str, Any]
    batch_size: int

    def __call__(self, task: EncodeTask, progress: Any = None) -> dict[str, Any]:
        spec, rows, t_shard = task.spec, self.rows, time.perf_counter()
        members = np.flatnonzero((rows.shard_of == spec.shard) & (rows.offsets >= 0))
        keys, chunks = [], []
        for i in range(0, len(members), self.batch_size):
            idx = members[i : i + self.batch_size]
            images = rows.pixels(idx).float().div_(127.5).sub_(1.0)  # as the loader: [B, 3, R, R]
            chunks.append(self.encode(images))  # [B, *shape]
            keys += [rows.keys[int(r)] for r in idx]
            if progress is not None:
                progress(len(idx))
        shape = tuple(chunks[0].shape[1:]) if chunks else tuple(self.item_shape)
        dim = int(np.prod(shape))
        flat = np.concatenate(chunks).reshape(len(keys), dim) if chunks else np.zeros((0, dim))
        rel = shard_file(spec.stage, spec.shard)
        size, out_digest = write_parquet_atomic(rows.cache / rel, self.table(keys, flat, shape))
        outs = [stat_out(rows.cache, rel, size, out_digest, rows=len(keys))]
        timings = {"total_s": round(time.perf_counter() - t_shard, 4)}
        extra = {"rows": len(keys), self.shape_field: list(shape), **self.extra}
        return commit_manifest(rows.cache, spec, outs, timings, extra=extra)


# ---------------------------------------------------------------------------------------------------------
# Reading: trainers look derived rows up by key
# ---------------------------------------------------------------------------------------------------------


class KeyedRows:
    """The committed, current derived rows of one model: key -> `values[row]`."""

    def __init__(self, keys: list[str], values: np.ndarray, stage: str):
        self.keys = keys
        self.index = {k: i for i, k in enumerate(keys)}
        self.values = values  # [N, *shape]
        self.stage = stage

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [B], values [n_found, *shape] of the found keys, in order)."""
        pos = np.array([self.index.get(k, -1) for k in keys], dtype=np.int64)
        found = pos >= 0
        return found, self.values[pos[found]]


@dataclass
class DerivedTable:
    keys: list[str]
    values: np.ndarray  # [N, *shape] of the kind's dtype
    shape: tuple[int, ...]
    metadata: dict[str, str]  # the first shard's schema metadata


def read_derived(kind: DerivedKind, cache: Path | str, checkpoint: Path | str) -> DerivedTable | None:
    """The rows `encode_derived` committed for this checkpoint file, or None when there are none. Shards
    made from an older embed shard (their deps no longer match), by another model, or whose file is
    missing or altered are left out: those images are encoded on the fly. A damaged one (bit rot) is
    removed too, with a warning, so the next `--encode` remakes it."""
    import pyarrow as pa

    from manifests.errors import Unreadable
    from pipeline.layout import shard_out
    from trainers.committed import read_parquet_committed

    cache = Path(cache)
    digest = model_digest(checkpoint)
    manifests = list_manifests(cache, kind.stage(digest))
    if not manifests:
        return None
    embed = list_manifests(cache, "embed")
    keys: list[str] = []
    parts: list[np.ndarray] = []
    shape, metadata = None, {}
    for shard, manifest in sorted(manifests.items()):
        source = embed.get(shard)
        out = shard_out(manifest, ".parquet")
        if source is None or out is None or manifest.get("params", {}).get(kind.digest_param) != digest:
            continue
        wanted = {(o["path"], o["digest"]) for o in source.get("outs", [])}
        deps = {(d["name"], d["digest"]) for d in manifest.get("deps", [])}
        if not deps or not deps <= wanted:
            continue  # made from an older embed shard
        try:
            table = read_parquet_committed(cache, out)
            if table is None:
                continue
            this = tuple(json.loads(table.schema.metadata[kind.shape_field.encode()]))
        except (Unreadable, KeyError, TypeError, ValueError):
            _forget_damaged(kind, cache / out["path"], cache, checkpoint)
            continue
        if shape is not None and this != shape:
            continue
        if shape is None:
            metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        shape = this
        column = table[kind.column]
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        values = column.flatten().to_numpy(zero_copy_only=False)  # [n * prod(shape)]
        parts.append(values.astype(kind.dtype, copy=False).reshape((-1, *shape)))
        keys += table["key"].to_pylist()
    if not keys or shape is None:
        return None
    return DerivedTable(keys, np.concatenate(parts), shape, metadata)


def _forget_damaged(kind: DerivedKind, path: Path, cache: Path, checkpoint: Path | str) -> None:
    """Derived rows are recomputable: a damaged shard is encoded on the fly instead, and removed so
    `--encode` sees it missing and remakes it (it would pass the size and mtime check otherwise)."""
    try:
        path.unlink(missing_ok=True)
        fix = f"removed; `{kind.command} --cache {cache} --encode {checkpoint}` remakes it"
    except OSError as e:
        fix = f"cannot remove it ({e.strerror}); delete it and rerun `{kind.command} --encode`"
    warnings.warn(f"{path}: damaged {kind.what}, so its images are encoded on the fly; {fix}", stacklevel=4)


def cached_or_computed(
    rows: KeyedRows | None,
    keys: list[str] | None,
    images: torch.Tensor,
    compute: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[B, *shape] on `device`: looked up by key in `rows` where it has them, the rest `compute`d now (no
    grad) from `images`; the cached values take the computed ones' dtype (or `dtype`, when all are
    cached)."""
    found = cached = None
    if rows is not None and keys is not None:
        found, cached = rows.lookup(list(keys))
        if found.all():
            values = torch.from_numpy(cached)
            return values.to(device=device, dtype=dtype or values.dtype, non_blocking=True)
    todo = images if found is None or not found.any() else images[torch.from_numpy(~found)]
    with torch.no_grad():
        computed = compute(todo)
    if found is None or not found.any():
        return computed
    hit = torch.from_numpy(found).to(device)
    out = torch.empty((len(found), *computed.shape[1:]), dtype=computed.dtype, device=device)
    out[hit] = torch.from_numpy(cached).to(device, computed.dtype)
    out[~hit] = computed
    return out


def encode_command(command: str, cache: Path | None, encode: Callable[[Any], Any]) -> Any:
    """`trainers {command} --encode`: one process (never under torchrun), holding the cache's lock (the
    derived folder is a stage of the cache, written like the pipeline's), with a progress bar; -> what
    `encode(advance)` returns."""
    from pipeline.cli_common import writing
    from pipeline.progress import progress_bar
    from trainers.distributed import launched_world

    if cache is None:
        raise ConfigError("--cache is required: the feature cache whose images --encode encodes")
    if launched_world().distributed:
        raise ConfigError(f"--encode runs as one process: run `trainers {command} --encode` without torchrun")
    with writing(cache), progress_bar(f"{command} --encode", total=None, unit="img") as advance:
        return encode(advance)
