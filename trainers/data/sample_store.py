"""The loader's sample set, derived once from the cache into files read per row, so a trainer's memory
does not grow with the cache.

    {cache}/_trainers/samples-{key}/info.json        what the loader found (LoaderInfo), written last
    {cache}/_trainers/samples-{key}/cond.npy         float16 [N, D]: each sample's condition feature
    {cache}/_trainers/samples-{key}/paired.npy       float16 [N, D]: the real-caption features (pairs only)
    {cache}/_trainers/samples-{key}/pool.npy         bool [N]: the samples that may be paired
    {cache}/_trainers/samples-{key}/where.npy        int64 [N, 3]: embed shard, image offset, image size
    {cache}/_trainers/samples-{key}/keys.npy         the samples' keys, UTF-8, fixed width, in sample order

`key` digests what decides the set: the embed shards' and the condition stage's committed outputs (from
their manifests), the caption features' inputs for retrieve, and the loader options that choose rows and
features (condition, tau_r, the paired pool). The first loader of a key builds the set the usual way
(trainers/data/loader.py reads every feature into memory once) and writes it here (a temp folder renamed into
place: concurrent builders at worst both build); every later one opens it and reads each batch's rows
with one `pread` per row (`RowFile`), so start-up and resident memory stay flat as the cache grows: no
array of the set is held, and no page of it is mapped into the process (the kernel's page cache, shared
by every process on the node, keeps what was read). A cache whose shards were partly skipped (`--allow-
partial`) is never stored: such a run reads the cache as before. A store whose files are damaged (cut
short, or bytes that differ from the digests its info.json records: trainers/data/store_files.py) is rebuilt
with a warning naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from manifests import digest_json, list_manifests
from trainers.data.store_files import (
    RowFile,
    check_sealed,
    info_bytes,
    new_folder,
    read_info,
    renew_info,
    seal_files,
)

STORE_VERSION = "2"  # 2: info.json records its files' digests
INFO = "info.json"


def store_key(config: Any, stage: str) -> str:
    """Digest of everything that decides the sample set of `config` (a LoaderConfig), from manifests."""
    cache = Path(config.cache)

    def outs(name: str) -> list:  # each shard's key (its inputs, deps and params) and outputs
        return [
            [shard, m.get("key"), [[o["path"], o["digest"]] for o in m.get("outs", [])], m.get("deps")]
            for shard, m in sorted(list_manifests(cache, name).items())
        ]

    stages = {"embed": outs("embed")}
    if stage != "embed":
        stages[stage] = outs(stage)
    if stage == "retrieve":
        stages["captions"] = outs("captions")
    pool = config.paired_limit is not None
    return digest_json(
        {
            "version": STORE_VERSION,
            "stages": stages,
            "condition": config.condition,
            "tau_r": config.tau_r if stage == "retrieve" else None,
            "paired": [config.needs_captions, config.paired_fraction, config.paired_limit]
            + [config.seed if pool else None],
        }
    )[:24]


def store_dir(cache: Path, key: str) -> Path:
    from trainers.data.conditions import TRAINERS_DIR

    return Path(cache) / TRAINERS_DIR / f"samples-{key}"


def write_store(folder: Path, dataset: Any, info: Any, stage: str) -> None:
    """Write a built CacheDataset and its LoaderInfo as a store (see the module docstring)."""
    rows, idx = dataset.rows, np.asarray(dataset.rows_idx)
    record = {
        "info": asdict(info),
        "probability": float(dataset.paired_probability),
        "tar_outs": {str(s): o for s, o in rows.images.tar_outs.items() if s in set(rows.shards)},
        "parquet_outs": {str(s): o for s, o in rows.parquet_outs.items()},
        "shards": list(rows.shards),
        "image_size": int(rows.image_size),
        "clip": asdict(rows.clip),
        # the files it was read from: a store is used only while they are still the committed ones
        "read_outs": _read_outs(rows.cache, stage, rows.shards),
    }
    where = np.stack([rows.shard_of[idx], rows.offsets[idx], rows.sizes[idx]], axis=1).astype(np.int64)
    arrays = {"cond": dataset.cond, "pool": dataset.paired_pool, "where": where}
    if dataset.paired_feat is not None:
        arrays["paired"] = dataset.paired_feat
    save_store(folder, arrays, [rows.keys[int(r)] for r in idx], record)
    prune_stores(rows.cache, keep=folder)


def prune_stores(cache: Path, keep: Path) -> None:
    """Remove the stored sets of this cache that no loader can open any more (a file they were made from
    changed): each holds a copy of the features, so they would otherwise pile up as the cache changes. A
    trainer still reading one keeps its open files (unlinked files live on while they are open)."""
    for folder in keep.parent.glob("samples-*"):
        if folder == keep or not (folder / INFO).is_file():
            continue
        try:
            record = json.loads((folder / INFO).read_text())
        except (OSError, ValueError):
            continue
        outs = record.get("read_outs", [])
        if record.get("version") != STORE_VERSION or not all(_intact(cache, out) for out in outs):
            shutil.rmtree(folder, ignore_errors=True)


def save_store(folder: Path, arrays: dict[str, np.ndarray], keys: list[str], record: dict[str, Any]) -> None:
    """The files of a store: `arrays` (cond float16 [N, D], pool bool [N], where int64 [N, 3], paired
    float16 [N, D] if any) and the keys as .npy, `record` as info.json last, in a temp folder renamed into
    place (a store appears whole or not at all). A cache that cannot be written (read-only) keeps the set
    in memory only, with a warning."""
    try:
        with new_folder(folder) as tmp:
            dtypes = {"cond": np.float16, "paired": np.float16, "pool": bool, "where": np.int64}
            for name, values in arrays.items():
                np.save(tmp / f"{name}.npy", np.asarray(values, dtypes[name]))
            np.save(tmp / "keys.npy", np.array([k.encode() for k in keys], dtype=bytes))  # dtype S{longest}
            files = seal_files(tmp, [f"{name}.npy" for name in [*arrays, "keys"]])
            (tmp / INFO).write_bytes(info_bytes({"version": STORE_VERSION, **record, "files": files}))
    except OSError as e:
        warnings.warn(f"cannot store the sample set in {folder} ({e}); kept in memory", stacklevel=3)


def _read_outs(cache: Path, stage: str, shards: list[int]) -> list[dict[str, Any]]:
    names = ["embed"] + ([stage] if stage != "embed" else []) + (["captions"] if stage == "retrieve" else [])
    found = []
    for name in names:
        for shard, manifest in list_manifests(cache, name).items():
            if name == "captions" or shard in shards:
                found += [{"path": o["path"], "size": o["size"]} for o in manifest.get("outs", [])]
    return found


class StoredKeys:
    """The samples' keys from keys.npy (UTF-8, fixed width), read per request: `keys[i]`, `len(keys)`."""

    def __init__(self, path: Path):
        self.file = RowFile(path)

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, i: int) -> str:
        return bytes(self.file[int(i)]).decode()


class StoredRows:
    """The embed rows of a stored sample set (sample i is row i): what CacheDataset reads per batch."""

    def __init__(self, cache: Path, record: dict[str, Any], where: RowFile, keys: StoredKeys, images):
        from feature_cache.clip_record import EmbeddedClip

        self.cache = Path(cache)
        self.clip = EmbeddedClip(**record["clip"])
        self.shards = list(record["shards"])
        self.parquet_outs = {int(s): o for s, o in record["parquet_outs"].items()}
        self.where, self.keys, self.images = where, keys, images

    def __len__(self) -> int:
        return len(self.where)

    @property
    def image_size(self) -> int:
        return self.images.image_size

    def image(self, row: int):
        shard, offset, size = (int(v) for v in self.where[int(row)])
        tar = self.cache / self.images.tar_outs[shard]["path"]
        return self.images.decode(
            self.images.read(shard, offset, size), f"{tar} (the image of key {self.keys[row]!r})"
        )

    def pixels(self, rows):
        import torch

        return torch.stack([self.image(int(r)) for r in rows])


class AllRows:
    """rows_idx of a stored set: sample j is row j (an identity index that holds no array)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        if isinstance(idx, int | np.integer):
            return int(idx)
        idx = np.asarray(idx)
        return np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)


def _intact(cache: Path, out: dict[str, Any]) -> bool:
    try:
        return os.stat(Path(cache) / out["path"]).st_size == out["size"]
    except OSError:
        return False


def open_store(cache: Path, folder: Path) -> tuple[dict[str, Any], StoredRows, dict[str, np.ndarray]] | None:
    """(record, rows, arrays cond/pool/paired) of a committed store, read per batch (`RowFile`); None when
    there is none, or a file it was made from is not the committed one any more (then the loader reads the
    cache)."""
    from feature_cache.committed import open_committed
    from feature_cache.tar_images import TarImages

    info_path = folder / INFO
    if not info_path.is_file():
        return None
    try:
        record = read_info(info_path)
        if record.get("version") != STORE_VERSION:
            return None
        if check_sealed(folder, record["files"]):
            renew_info(info_path, record)
        names = ("cond", "pool", "where", "paired")
        arrays = {
            n: RowFile(folder / f"{n}.npy") for n in names if n != "paired" or (folder / f"{n}.npy").is_file()
        }
        if not record["info"].get("paired_pool"):  # no sample may be paired: nothing to read
            arrays["pool"] = np.zeros(0, dtype=bool)
        keys = StoredKeys(folder / "keys.npy")
        n = len(arrays["where"])
        if not (len(arrays["cond"]) == len(keys) == n):
            raise ValueError("its files disagree on the number of samples")
    except (OSError, ValueError, KeyError, TypeError) as e:  # derived: rebuilt rather than fatal
        warnings.warn(f"{folder}: cannot be read ({e}); rebuilding it", stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    if not all(_intact(cache, out) for out in record["read_outs"]):
        return None  # a shard it was made from is being rewritten: the loader waits or refuses as usual
    tar_outs = {int(s): o for s, o in record["tar_outs"].items()}
    fds = {}
    for shard, out in tar_outs.items():
        fd = open_committed(cache, out)
        if fd is None:  # a tar being rewritten: read the cache the usual way (it waits or refuses)
            for held in fds.values():
                os.close(held)
            return None
        fds[shard] = fd
    images = TarImages(cache, tar_outs, fds, int(record["image_size"]))
    return record, StoredRows(cache, record, arrays["where"], keys, images), arrays
