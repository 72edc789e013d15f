"""The latent and token caches (trainers/data/derived.py) as the trainers read them: derived once per
cache state into files read per batch, so a trainer's memory does not grow with the cache.

    {cache}/_trainers/derived-{root}-{model_id}-{key}/info.json    what it holds and was made from, last
    {cache}/_trainers/derived-{root}-{model_id}-{key}/values.npy   [M, *row] every usable shard's values
    {cache}/_trainers/derived-{root}-{model_id}-{key}/index.npy    [N] (key, row): sorted by key, one a key
    {cache}/_trainers/derived-{root}-{model_id}-{key}/sparse.npy   every BLOCK-th key of index.npy

`key` digests the model's digest and the manifests `read_derived` decides with (the derived stage's, and
the embed outputs their deps must be among). values.npy holds the rows in shard order in the kind's dtype
(the one the schema fixes, float32 latents and int16 tokens, so a lookup returns exactly the in-memory
read's numbers); index.npy the keys (UTF-8, fixed width) sorted, each with its row (a key found twice: the
later one, as a dict would). A lookup searches the sparse keys, the only part held in memory (N / 256 of
them), reads the block of BLOCK index records the key falls in with one `pread`, and the value row with
one more: no dict of N keys, no array of N values, nothing mapped (`RowFile`).

A store is used only while every derived shard file it saw has the size, mtime, ctime and inode it had
when the store was made (a write changes a file's ctime even when its mtime is put back), so a shard
removed, altered or restored since makes it derive again; the derive reads and checks every shard as
`read_derived` does (a damaged one removed with the same warning), streaming the values shard by shard
and holding only the keys (their bytes and an int64 each) while it sorts them. One process derives at a
time per model (a lock file next to the stores: the other ranks of a torchrun job wait, then open it); the
stores of the model's older cache states, and of models with no shards left, are removed. A store whose
files are damaged is rebuilt with a warning; a cache that cannot be written keeps the rows in memory
(`KeyedRows`), with a warning. Damage counts whatever its size: info.json records each file's digest,
checked before the store is used (trainers/data/store_files.py).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from manifests import digest_json, list_manifests
from trainers.data.derived import (
    ID_HEX,
    DerivedKind,
    KeyedRows,
    committed_parts,
    model_digest,
    read_derived,
)
from trainers.data.store_files import (
    RowFile,
    check_sealed,
    file_stamp,
    info_bytes,
    new_folder,
    npy_header,
    read_info,
    renew_info,
    seal_files,
)

STORE_VERSION = "2"  # 2: info.json records its own files' digests
INFO = "info.json"
BLOCK = 256  # index records a sparse key stands for: one pread of BLOCK * (width + 8) bytes per key looked up
CHUNK = 4096  # keys searched at once
HEADER = 512  # bytes reserved for values.npy's header, written in place once the rows are counted


def load_derived(
    kind: DerivedKind, cache: Path | str, checkpoint: Path | str
) -> StoredRows | KeyedRows | None:
    """The committed, current `kind` rows of this checkpoint file (what `read_derived` would read), from
    their store, derived first when there is none for this cache state; None when there are none."""
    cache = Path(cache)
    digest = model_digest(checkpoint)
    manifests = list_manifests(cache, kind.stage(digest))
    if not manifests:
        return None
    embed = list_manifests(cache, "embed")
    folder = store_dir(kind, cache, digest, store_key(kind, digest, manifests, embed))
    rows = open_store(kind, cache, folder)
    if rows is None:
        try:
            with _derive_lock(folder):
                rows = open_store(kind, cache, folder)  # another process derived it while this one waited
                if rows is None:
                    derive_store(kind, cache, checkpoint, folder, digest, manifests, embed)
                    rows = open_store(kind, cache, folder)
        except OSError as e:
            warnings.warn(f"cannot store the {kind.what} in {folder} ({e}); kept in memory", stacklevel=3)
        if rows is None:  # not writable, or a shard changed while it was derived: read them as they are
            return read_derived(kind, cache, checkpoint)
    return rows if len(rows) else None


def store_key(
    kind: DerivedKind, digest: str, manifests: dict[int, dict[str, Any]], embed: dict[int, dict[str, Any]]
) -> str:
    """Digest of everything `read_derived` decides with but the files' bytes (checked by their stamps)."""
    return digest_json(
        {
            "version": STORE_VERSION,
            "kind": [kind.root, kind.version, kind.column, kind.dtype, kind.flat_rows],
            "model": digest,
            "derived": [[shard, m] for shard, m in sorted(manifests.items())],
            "embed": [
                [s, [[o["path"], o["digest"]] for o in m.get("outs", [])]] for s, m in sorted(embed.items())
            ],
        }
    )[:24]


def store_dir(kind: DerivedKind, cache: Path, digest: str, key: str) -> Path:
    from trainers.data.conditions import TRAINERS_DIR

    return Path(cache) / TRAINERS_DIR / f"derived-{kind.root}-{digest[:ID_HEX]}-{key}"


def derive_store(
    kind: DerivedKind,
    cache: Path,
    checkpoint: Path | str,
    folder: Path,
    digest: str,
    manifests: dict[int, dict[str, Any]],
    embed: dict[int, dict[str, Any]],
) -> None:
    """Write the store of these manifests' usable shards (`committed_parts`) into `folder`, then remove
    the stores no loader can use any more. Raises OSError when the cache cannot be written."""
    import pyarrow as pa

    from feature_cache.layout import shard_out

    with new_folder(folder) as tmp:
        keys, rows, shape, metadata = [], 0, None, {}
        with open(tmp / "values.npy", "wb") as f:
            f.write(bytes(HEADER))
            for part in committed_parts(kind, cache, checkpoint, digest, manifests, embed):
                if shape is None:
                    shape, metadata = part.shape, part.metadata
                f.write(np.ascontiguousarray(part.values).data)
                keys.append(np.array([k.encode() for k in part.keys], dtype=bytes))  # S{longest}
                rows += len(part.keys)
            f.seek(0)
            f.write(npy_header(np.dtype(kind.dtype), (rows, *kind.row_shape(shape or ())), HEADER))
        index = sorted_index(np.concatenate(keys) if keys else np.zeros(0, "S1"))
        np.save(tmp / "index.npy", index)
        np.save(tmp / "sparse.npy", np.ascontiguousarray(index["key"][::BLOCK]))
        record = {
            "version": STORE_VERSION,
            "stage": kind.stage(digest),
            "digest": digest,
            "shape": list(shape or ()),
            "metadata": metadata,
            "rows": len(index),
            "values_rows": rows,
            # stamped after the reads: a damaged shard they removed is recorded missing
            "files": _stamps(
                cache, [o["path"] for m in manifests.values() if (o := shard_out(m, ".parquet"))]
            ),
            "own_files": seal_files(tmp, ["values.npy", "index.npy", "sparse.npy"]),
        }
        (tmp / INFO).write_bytes(info_bytes(record))
    prune_stores(kind, cache, digest, keep=folder)
    # the shards' buffers go back to the OS, not to pyarrow's pool: this process trains on afterwards
    # (its resident memory after deriving 1M latents: 580 MiB instead of 953, of which 511 are imports)
    pa.default_memory_pool().release_unused()


def sorted_index(keys: np.ndarray) -> np.ndarray:
    """keys S{w} [M] (row i's key) -> records (key, row) sorted by key, one per key: its last row."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    last = np.ones(len(keys), bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    index = np.empty(int(last.sum()), [("key", keys.dtype), ("row", "<i8")])
    index["key"], index["row"] = ordered[last], order[last]
    return index


def prune_stores(kind: DerivedKind, cache: Path, digest: str, keep: Path) -> None:
    """Remove this kind's stores that no loader can open any more: the model's other (older) cache states,
    and those of models with no manifests left. A trainer still reading one keeps its open files."""
    prefix = f"derived-{kind.root}-"
    for folder in keep.parent.glob(f"{prefix}*"):
        model_id = folder.name[len(prefix) :].split("-")[0]
        gone = not any((Path(cache) / kind.root / model_id / "_manifests").glob("*.json"))
        if folder != keep and (model_id == digest[:ID_HEX] or gone):
            shutil.rmtree(folder, ignore_errors=True)


def open_store(kind: DerivedKind, cache: Path, folder: Path) -> StoredRows | None:
    """The store in `folder`, opened for lookups; None when there is none, or a shard file it was made
    from has changed since (then it is removed, to be derived again)."""
    info = folder / INFO
    if not info.is_file():
        return None
    try:
        record = read_info(info)
        if record.get("version") != STORE_VERSION:
            raise ValueError(f"store version {record.get('version')!r}, not {STORE_VERSION!r}")
        if check_sealed(folder, record["own_files"]):
            renew_info(info, record)
        rows, files = StoredRows(kind, folder, record), dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # derived: rebuilt rather than fatal
        warnings.warn(f"{folder}: cannot be read ({e}); rebuilding it", stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    if _stamps(cache, list(files)) != files:
        shutil.rmtree(folder, ignore_errors=True)  # a shard was removed, rewritten or restored since
        return None
    return rows


def _stamps(cache: Path, paths: list[str]) -> dict[str, list[int] | None]:
    """path -> [size, mtime_ns, ctime_ns, inode], None when missing."""
    stamps = {}
    for path in paths:
        try:
            stamps[path] = file_stamp(os.stat(Path(cache) / path))
        except OSError:
            stamps[path] = None
    return stamps


@contextmanager
def _derive_lock(folder: Path) -> Iterator[None]:
    """One deriving process per model: the others wait here, then find its store."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    model = folder.name.rsplit("-", 1)[0]  # derived-{root}-{model_id}
    fd = os.open(folder.parent / f".{model}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class StoredRows:
    """A derived store open for lookups: what `KeyedRows` is in memory, read per batch (see the module
    docstring). Holds the sparse keys (N / BLOCK of them) and three open files."""

    def __init__(self, kind: DerivedKind, folder: Path, record: dict[str, Any]):
        self.stage = record["stage"]
        self.shape = tuple(record["shape"])  # an item's shape (the schema metadata's)
        self.metadata = dict(record["metadata"])  # the first shard's schema metadata
        self.value_file = RowFile(folder / "values.npy")  # [M, *row] kind.dtype, in shard order
        self.index_file = RowFile(folder / "index.npy")  # [N] (key S{w}, row int64), sorted by key
        self.sparse = np.load(folder / "sparse.npy")  # [ceil(N / BLOCK)] S{w}
        n, dtype = len(self.index_file), self.index_file.dtype
        if dtype.names != ("key", "row") or self.sparse.dtype != dtype["key"]:
            raise ValueError("its index is not of (key, row) records")
        if n != record["rows"] or len(self.sparse) != -(-n // BLOCK):
            raise ValueError(
                f"its index holds {n} keys and {len(self.sparse)} sparse ones, not {record['rows']}"
            )
        if len(self.value_file) != record["values_rows"] or self.value_file.dtype != np.dtype(kind.dtype):
            raise ValueError(f"values.npy holds {len(self.value_file)} {self.value_file.dtype} rows")
        if n and self.value_file.row_shape != kind.row_shape(self.shape):
            raise ValueError(
                f"values.npy rows are {self.value_file.row_shape}, not {kind.row_shape(self.shape)}"
            )

    def __len__(self) -> int:
        return len(self.index_file)

    def find(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(position in the sorted keys, row of values.npy), each int64 [B], -1 where a key is absent."""
        if len(keys) > CHUNK:  # bounds the [n, BLOCK] comparisons below (10 MB a chunk at 10-byte keys)
            found = [self.find(keys[i : i + CHUNK]) for i in range(0, len(keys), CHUNK)]
            return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
        pos, rows = np.full(len(keys), -1, np.int64), np.full(len(keys), -1, np.int64)
        width = self.sparse.dtype.itemsize
        encoded = [k.encode() for k in keys]
        where = np.array([i for i, b in enumerate(encoded) if len(b) <= width], np.int64)  # longer: absent
        if not len(self) or not len(where):
            return pos, rows
        asked = np.array([encoded[i] for i in where], self.sparse.dtype)
        block = np.searchsorted(self.sparse, asked, side="right") - 1  # the block whose first key <= it
        where, asked, block = where[block >= 0], asked[block >= 0], block[block >= 0]
        blocks, mine = np.unique(block, return_inverse=True)
        records = np.zeros((len(blocks), BLOCK), self.index_file.dtype)  # [blocks, BLOCK]: one pread each
        sizes = np.empty(len(blocks), np.int64)
        for j, b in enumerate(blocks.tolist()):
            span = self.index_file.span(b * BLOCK, (b + 1) * BLOCK)
            records[j, : len(span)], sizes[j] = span, len(span)
        # each key's place in its block, all at once (a loop over the blocks: 0.71 ms a batch of 64 keys of
        # 300k, this: 0.51 ms)
        real = np.arange(BLOCK) < sizes[mine, None]  # [n, BLOCK]: not the last block's padding
        at = np.minimum(((records["key"][mine] < asked[:, None]) & real).sum(1), sizes[mine] - 1)
        hit = records["key"][mine, at] == asked
        pos[where[hit]] = blocks[mine[hit]] * BLOCK + at[hit]
        rows[where[hit]] = records["row"][mine[hit], at[hit]]
        return pos, rows

    def lookup(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [B], values [n_found, *row] of the found keys, in order): two preads per key."""
        _, rows = self.find(list(keys))
        found = rows >= 0
        return found, self.value_file[rows[found]]

    @property
    def keys(self) -> SortedKeys:
        return SortedKeys(self.index_file)

    @property
    def index(self) -> KeyPositions:
        return KeyPositions(self)

    @property
    def values(self) -> KeyOrderedValues:
        return KeyOrderedValues(self)


class SortedKeys:
    """The store's keys in sorted order, read per request: `keys[i]`, `len(keys)`."""

    def __init__(self, index_file: RowFile):
        self.index_file = index_file

    def __len__(self) -> int:
        return len(self.index_file)

    def __getitem__(self, i: int) -> str:
        return self.index_file[int(i)]["key"].item().decode()


class KeyPositions:
    """key -> its position in `SortedKeys`, looked up in the store: `index[key]`, `index.get(key)`, `in`."""

    def __init__(self, rows: StoredRows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str, default: int | None = None) -> int | None:
        pos = int(self.rows.find([key])[0][0])
        return default if pos < 0 else pos

    def __getitem__(self, key: str) -> int:
        pos = self.get(key)
        if pos is None:
            raise KeyError(key)
        return pos

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None


class KeyOrderedValues:
    """The values in sorted-key order (`values[i]` is `keys[i]`'s), read per request: `shape`, `dtype`,
    `len()`, `values[i]`, `values[idx]`."""

    def __init__(self, rows: StoredRows):
        self.rows = rows
        self.dtype = rows.value_file.dtype
        self.shape = (len(rows), *rows.value_file.row_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if isinstance(idx, int | np.integer):
            return self.rows.value_file[int(self.rows.index_file[int(idx)]["row"])]
        return self.rows.value_file[self.rows.index_file[idx]["row"]]
