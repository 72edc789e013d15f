"""The store the latent and token caches are read through (trainers/data/derived_store.py): every key's values
equal the in-memory read's bit for bit, absent keys are not found, a second load opens what the first
derived, and any change to what it was made from (an embed shard remade, a shard re-encoded, removed,
altered or restored, the store itself damaged) is seen; a cache that cannot be written reads as before."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
from factories import flip_middle

from feature_cache.layout import shard_file
from feature_cache.writer import CacheWriter
from manifests import Dep, ShardSpec, commit_manifest, list_manifests, stat_out, write_parquet_atomic
from trainers.autoencoders.dvae import encode as tokens
from trainers.autoencoders.vae import encode as latents
from trainers.data import derived_store
from trainers.data.derived import KeyedRows, model_digest, read_derived
from trainers.data.derived_store import BLOCK, StoredRows, load_derived

KINDS = {"latents": (latents, (2, 3, 3)), "tokens": (tokens, (4, 5))}


def _keys(shard: int, n: int) -> list[str]:
    """Unsorted keys of mixed lengths, some not ASCII, none shared with another shard."""
    rng = np.random.default_rng(shard)
    return [f"s{shard}/{'é' * (i % 3)}{int(rng.integers(0, 10**9)):d}-{i}" for i in rng.permutation(n)]


def write_shard(cache, kind_name: str, digest: str, shard: int, keys: list[str], seed: int = 0) -> np.ndarray:
    """Commit `kind_name` shard `shard` of the model `digest` for `keys` (from embed shard `shard`, as
    `--encode` would); returns its values [n, *shape]."""
    module, shape = KINDS[kind_name]
    kind = module.KIND
    rng = np.random.default_rng([shard, seed])
    if kind.dtype == "int16":
        values = rng.integers(0, 64, (len(keys), *shape)).astype(np.int16)
        table = module.CODEC.table(keys, values.reshape(len(keys), -1), shape, vocab_size=64)
    else:
        values = rng.standard_normal((len(keys), *shape)).astype(np.float32)
        table = module.CODEC.table(keys, values.reshape(len(keys), -1), shape)
    stage = kind.stage(digest)
    rel = shard_file(stage, shard)
    size, out_digest = write_parquet_atomic(cache / rel, table)
    embed = list_manifests(cache, "embed")[shard]
    deps = [Dep(o["path"], o["digest"]) for o in embed["outs"]]
    params = {kind.digest_param: digest, **dict(kind.params)}
    spec = ShardSpec(stage, shard, kind.version, params, deps, {})
    outs = [stat_out(cache, rel, size, out_digest, rows=len(keys))]
    commit_manifest(cache, spec, outs, {}, extra={"rows": len(keys), kind.shape_field: list(shape)})
    return values


def write_embed(cache, shard: int, keys: list[str], seed: int = 0) -> None:
    feats = np.random.default_rng([shard, seed]).standard_normal((len(keys), 4)).astype(np.float16)
    CacheWriter(cache, 4).embed(shard, keys, feats)


@pytest.fixture(params=sorted(KINDS))
def world(request, tmp_path):
    """(kind name, cache, model checkpoint, digest, {shard: keys}): 3 embed shards of 700, 300 and 600
    keys, each encoded by a stand-in model (a file: the caches are keyed on its bytes)."""
    cache, checkpoint = tmp_path / "cache", tmp_path / "model.pt"
    checkpoint.write_bytes(os.urandom(64))
    digest = model_digest(checkpoint)
    shards = {0: _keys(0, 700), 1: _keys(1, 300), 2: _keys(2, 600)}
    for shard, keys in shards.items():
        write_embed(cache, shard, keys)
        write_shard(cache, request.param, digest, shard, keys)
    return request.param, cache, checkpoint, digest, shards


def _kind(world):
    return KINDS[world[0]][0].KIND


def stores(cache) -> list:
    return sorted((cache / "_trainers").glob("derived-*"))


def same_rows(stored, memory: KeyedRows, keys: list[str]) -> None:
    """Every key of `keys` looked up in both: the same found flags and bit-identical values."""
    found, values = stored.lookup(keys)
    want_found, want = memory.lookup(keys)
    assert found.tolist() == want_found.tolist()
    assert values.dtype == want.dtype and values.shape == want.shape
    assert values.tobytes() == want.tobytes()


def test_every_key_looks_up_the_same_values_as_the_in_memory_read(world, monkeypatch):
    name, cache, checkpoint, _, shards = world
    kind = _kind(world)
    stored, memory = load_derived(kind, cache, checkpoint), read_derived(kind, cache, checkpoint)
    assert isinstance(stored, StoredRows) and len(stored) == len(memory) == 1600
    assert len(stored.sparse) == -(-1600 // BLOCK)  # what it holds in memory: every 256th key
    keys = [k for ks in shards.values() for k in ks]
    same_rows(stored, memory, keys)
    assert stored.value_file.dtype == np.dtype(kind.dtype) == memory.values.dtype  # float32 / int16
    shuffled = list(np.random.default_rng(5).permutation(keys))
    same_rows(stored, memory, shuffled[:64])  # a batch: found rows come back in the batch's order
    monkeypatch.setattr(derived_store, "CHUNK", 97)  # many keys are searched a chunk at a time
    same_rows(stored, memory, shuffled + ["absent"] * 3)

    # absent: unknown, empty, a prefix or extension of a key, longer than any key, across block edges
    sorted_keys = sorted(keys)
    absent = ["zzz", "", "s0", keys[0] + "x", keys[3][:-1], "s" * 500, "s1/" + "\uffff"]
    absent += [k + "\0x" for k in sorted_keys[BLOCK - 1 : BLOCK + 1]]
    found, values = stored.lookup(absent + keys[:3])
    assert found.tolist() == [False] * len(absent) + [True] * 3 and len(values) == 3
    assert not stored.lookup([])[0].size

    # the inspection views, in sorted-key order, read per request
    assert [stored.keys[i] for i in range(len(stored))] == sorted_keys
    assert stored.index[sorted_keys[300]] == 300 and "zzz" not in stored.index
    assert (
        stored.values.shape == (1600, *memory.values.shape[1:]) and stored.values.dtype == memory.values.dtype
    )
    assert stored.values[300].tobytes() == memory.values[memory.index[sorted_keys[300]]].tobytes()

    # values.npy is an ordinary .npy (its header written last, in place): the shards' rows in order
    (folder,) = stores(cache)
    assert np.load(folder / "values.npy").tobytes() == memory.values.tobytes()
    assert name in folder.name


def test_a_second_load_opens_the_store_without_deriving(world, monkeypatch):
    _, cache, checkpoint, _, shards = world
    kind = _kind(world)
    first = load_derived(kind, cache, checkpoint)
    (folder,) = stores(cache)
    inode = (folder / "values.npy").stat().st_ino
    monkeypatch.setattr(derived_store, "derive_store", lambda *a: pytest.fail("derived again"))
    monkeypatch.setattr(derived_store, "read_derived", lambda *a: pytest.fail("read into memory"))
    again = load_derived(kind, cache, checkpoint)
    assert isinstance(again, StoredRows) and stores(cache) == [folder]
    assert (folder / "values.npy").stat().st_ino == inode
    keys = shards[2][:50]
    assert again.lookup(keys)[1].tobytes() == first.lookup(keys)[1].tobytes()


def test_a_remade_embed_shard_or_a_reencoded_shard_derives_a_new_store(world):
    name, cache, checkpoint, digest, shards = world
    kind = _kind(world)
    load_derived(kind, cache, checkpoint)
    (old,) = stores(cache)

    write_embed(cache, 1, shards[1], seed=1)  # embed shard 1 remade: its tokens / latents are stale
    stored, memory = load_derived(kind, cache, checkpoint), read_derived(kind, cache, checkpoint)
    assert len(stored) == len(memory) == 1300 and not stored.lookup(shards[1][:5])[0].any()
    same_rows(stored, memory, [k for ks in shards.values() for k in ks])
    (new,) = stores(cache)
    assert new != old  # the stale store is removed

    values = write_shard(cache, name, digest, 1, shards[1], seed=7)  # re-encoded against the new embed
    write_shard(cache, name, digest, 0, shards[0], seed=8)
    stored = load_derived(kind, cache, checkpoint)
    assert len(stored) == 1600 and stores(cache) != [new]
    found, got = stored.lookup(shards[1])
    assert found.all() and got.tobytes() == values.reshape(got.shape).tobytes()
    same_rows(stored, read_derived(kind, cache, checkpoint), [k for ks in shards.values() for k in ks])


def test_a_removed_altered_or_restored_shard_file_is_seen(world):
    _, cache, checkpoint, digest, shards = world
    kind = _kind(world)
    everything = [k for ks in shards.values() for k in ks]
    load_derived(kind, cache, checkpoint)
    path = cache / kind.stage(digest) / "00002.parquet"
    original = path.read_bytes()

    path.unlink()  # removed: its rows are encoded on the fly, as the in-memory read does
    stored = load_derived(kind, cache, checkpoint)
    assert isinstance(stored, StoredRows) and len(stored) == 1000  # a store of what is left
    assert not stored.lookup(shards[2][:3])[0].any() and len(stores(cache)) == 1
    same_rows(stored, read_derived(kind, cache, checkpoint), everything)

    path.write_bytes(original)  # restored as it was committed: read again
    stored = load_derived(kind, cache, checkpoint)
    assert isinstance(stored, StoredRows) and len(stored) == 1600

    st = path.stat()
    raw = bytearray(original)
    raw[len(raw) // 2] ^= 0xFF  # bit rot: size and mtime unchanged
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(UserWarning, match=f"00002.parquet: damaged {kind.what}, .* on the fly; removed"):
        stored = load_derived(kind, cache, checkpoint)
    assert isinstance(stored, StoredRows) and len(stored) == 1000 and not path.exists()
    same_rows(stored, read_derived(kind, cache, checkpoint), everything)


@pytest.mark.parametrize(
    "damage", ["index", "values", "info", "values_flipped", "index_flipped", "sparse_flipped"]
)
def test_a_damaged_store_is_rebuilt_with_a_warning(world, damage):
    _, cache, checkpoint, _, shards = world
    kind = _kind(world)
    load_derived(kind, cache, checkpoint)
    (folder,) = stores(cache)
    if damage == "index":
        (folder / "index.npy").write_bytes(b"not an array")
    elif damage == "values":
        with open(folder / "values.npy", "r+b") as f:
            f.truncate(os.path.getsize(folder / "values.npy") - 7)
    elif damage == "info":
        record = json.loads((folder / "info.json").read_text())
        (folder / "info.json").write_text(json.dumps({**record, "rows": 3}))
    else:  # same size, same mtime
        flip_middle(folder / f"{damage.split('_')[0]}.npy", 64)
    match = f"derived-.*cannot be read.*{damage.split('_')[0] if 'flipped' in damage else ''}.*rebuilding it"
    with pytest.warns(UserWarning, match=match):
        stored = load_derived(kind, cache, checkpoint)
    assert isinstance(stored, StoredRows) and len(stored) == 1600
    same_rows(stored, read_derived(kind, cache, checkpoint), [k for ks in shards.values() for k in ks])


def test_a_cache_that_cannot_be_written_keeps_the_rows_in_memory(world):
    _, cache, checkpoint, _, shards = world
    kind = _kind(world)
    shutil.rmtree(cache / "_trainers", ignore_errors=True)
    (cache / "_trainers").write_text("")  # stands in for a read-only cache (root ignores permissions)
    with pytest.warns(UserWarning, match=f"cannot store the {kind.what} in .*; kept in memory"):
        rows = load_derived(kind, cache, checkpoint)
    assert isinstance(rows, KeyedRows) and len(rows) == 1600
    same_rows(rows, read_derived(kind, cache, checkpoint), [k for ks in shards.values() for k in ks])


def test_no_usable_shard_is_none_and_a_key_found_twice_is_the_later_one(world):
    name, cache, checkpoint, digest, shards = world
    kind = _kind(world)
    other = cache.parent / "other.pt"
    other.write_bytes(b"another model")
    assert load_derived(kind, cache, other) is None  # no shards of this model

    for shard, keys in shards.items():  # every embed shard remade: every derived one is stale
        write_embed(cache, shard, keys, seed=2)
    assert load_derived(kind, cache, checkpoint) is None and read_derived(kind, cache, checkpoint) is None

    write_embed(cache, 0, shards[0], seed=3)
    write_embed(cache, 1, shards[1] + shards[0][:10], seed=3)  # ten keys in two shards
    write_shard(cache, name, digest, 0, shards[0])
    later = write_shard(cache, name, digest, 1, shards[1] + shards[0][:10], seed=4)
    stored, memory = load_derived(kind, cache, checkpoint), read_derived(kind, cache, checkpoint)
    assert len(stored) == len(memory) == 1000
    found, got = stored.lookup(shards[0][:10])
    assert found.all() and got.tobytes() == later[-10:].reshape(got.shape).tobytes()
    same_rows(stored, memory, shards[0] + shards[1])


def test_a_store_derived_while_waiting_for_the_lock_is_opened(world, monkeypatch):
    """Ranks of one job load at once: the first derives, the others wait on the lock, then open it."""
    _, cache, checkpoint, _, shards = world
    kind = _kind(world)
    lock = derived_store._derive_lock

    @contextmanager
    def waiting(folder):
        with monkeypatch.context() as other_rank:  # meanwhile another process derives it
            other_rank.setattr(derived_store, "_derive_lock", lock)
            assert isinstance(load_derived(kind, cache, checkpoint), StoredRows)
        monkeypatch.setattr(derived_store, "derive_store", lambda *a: pytest.fail("derived twice"))
        with lock(folder):
            yield

    monkeypatch.setattr(derived_store, "_derive_lock", waiting)
    stored = load_derived(kind, cache, checkpoint)
    assert isinstance(stored, StoredRows) and len(stores(cache)) == 1
    same_rows(stored, read_derived(kind, cache, checkpoint), shards[0])
