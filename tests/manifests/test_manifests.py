"""Manifests, fingerprints, the shard plan and atomic commits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from manifests import (
    Dep,
    ShardPlan,
    ShardSpec,
    atomic_write,
    check_shard,
    clean_temp_files,
    commit_manifest,
    digest_file_content,
    digest_input_file,
    group_units,
    read_manifest,
    stat_out,
    write_bytes_atomic,
)
from manifests.errors import Unreadable


def test_atomic_write_commits_with_digest_of_the_bytes(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    size, digest = write_bytes_atomic(path, b"hello world")
    assert path.read_bytes() == b"hello world"
    assert size == 11
    assert digest == digest_file_content(path)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"partial new content")
        raise RuntimeError("killed half-way")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_clean_temp_files_removes_leftovers_of_killed_writers(tmp_path):
    (tmp_path / ".00001.tar.tmp-abc").write_bytes(b"x")
    (tmp_path / "00001.tar").write_bytes(b"y")
    assert clean_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["00001.tar"]


def test_input_digest_changes_with_size_mtime_and_name_but_not_location(tmp_path):
    a = tmp_path / "a.jpg"
    a.write_bytes(b"abc")
    os.utime(a, ns=(1_000_000_000, 1_000_000_000))
    base = digest_input_file(a, "a.jpg")
    assert digest_input_file(a, "b.jpg") != base
    os.utime(a, ns=(2_000_000_000, 2_000_000_000))
    assert digest_input_file(a, "a.jpg") != base
    # content mode ignores the mtime but sees the bytes
    content = digest_input_file(a, "a.jpg", content=True)
    os.utime(a, ns=(3_000_000_000, 3_000_000_000))
    assert digest_input_file(a, "a.jpg", content=True) == content
    a.write_bytes(b"abd")
    assert digest_input_file(a, "a.jpg", content=True) != content


def _spec(shard=0, params=None, deps=None, version="1"):
    return ShardSpec("embed", shard, version, params or {"k": 1}, deps or [Dep("a", "d1"), Dep("b", "d2")])


def test_key_is_order_insensitive_in_deps_and_sensitive_to_everything_keyed():
    base = _spec()
    assert _spec(deps=[Dep("b", "d2"), Dep("a", "d1")]).key == base.key
    assert _spec(params={"k": 2}).key != base.key
    assert _spec(version="2").key != base.key
    assert _spec(deps=[Dep("a", "d1")]).key != base.key
    unkeyed = _spec()
    unkeyed.unkeyed = {"batch_size": 7}
    assert unkeyed.key == base.key


def _commit(tmp_path, spec):
    size, digest = write_bytes_atomic(tmp_path / "embed" / "00000.tar", b"data")
    return commit_manifest(tmp_path, spec, [stat_out(tmp_path, "embed/00000.tar", size, digest, 1)], {})


def test_check_shard_reasons(tmp_path):
    spec = _spec()
    assert check_shard(tmp_path, spec) == "new shard"
    _commit(tmp_path, spec)
    assert read_manifest(tmp_path, "embed", 0)["key"] == spec.key
    assert check_shard(tmp_path, spec) is None
    assert check_shard(tmp_path, _spec(params={"k": 2})) == "params changed: k"
    assert check_shard(tmp_path, _spec(version="2")) == "stage code version 1 -> 2"
    assert check_shard(tmp_path, _spec(deps=[Dep("a", "zz")])) == "inputs changed"
    out = tmp_path / "embed" / "00000.tar"
    out.write_bytes(b"DATA")  # same size, new mtime
    os.utime(out, ns=(1, 1))
    assert check_shard(tmp_path, spec).startswith("output altered")
    out.unlink()
    assert check_shard(tmp_path, spec).startswith("output missing")


def test_verify_detects_content_change_that_keeps_size_and_mtime(tmp_path):
    spec = _spec()
    _commit(tmp_path, spec)
    out = tmp_path / "embed" / "00000.tar"
    st = os.stat(out)
    out.write_bytes(b"DATA")
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_shard(tmp_path, spec) is None  # stats cannot see it
    assert check_shard(tmp_path, spec, verify=True).startswith("output damaged")


def test_torn_manifest_means_the_shard_is_remade_and_says_so(tmp_path):
    spec = _spec()
    _commit(tmp_path, spec)
    (tmp_path / "embed" / "_manifests" / "00000.json").write_text('{"stage": "emb')
    assert check_shard(tmp_path, spec) == "manifest unreadable (damaged): shard will be remade"
    (tmp_path / "embed" / "_manifests" / "00000.json").unlink()
    assert check_shard(tmp_path, spec).startswith("manifest missing (outputs exist without it)")


def test_plan_is_rebuilt_from_the_manifests_keeping_every_shard_index():
    manifests = {0: {"deps": [{"name": "a"}, {"name": "b"}]}, 2: {"deps": [{"name": "d"}]}}
    assert ShardPlan.from_manifests(manifests).shards == [["a", "b"], [], ["d"]]


def test_disk_full_survives_pickling_with_its_message():
    import pickle

    from manifests.errors import DiskFull, with_space_needed

    error = with_space_needed(DiskFull("no space left on device writing x", 4096), Path("c"), [], 3)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.written == 4096
    assert "The 3 unfinished shard(s) need at least 12.3 KB" in str(again)


def test_plan_is_append_only(tmp_path):
    path = tmp_path / "_plan.json"
    plan = ShardPlan.load(path)
    assert plan.append(group_units(["a", "b", "c"], 2)) == [0, 1]
    plan.save(path)
    again = ShardPlan.load(path)
    assert again.shards == [["a", "b"], ["c"]]
    # known units are ignored, new ones go into new shards; nothing moves
    assert again.append([["b", "d"], ["e"]]) == [2, 3]
    assert again.shards == [["a", "b"], ["c"], ["d"], ["e"]]
    assert again.append([["a"]]) == []


def test_plan_refuses_unknown_version(tmp_path):
    path = tmp_path / "_plan.json"
    path.write_text('{"version": 99, "shards": []}')
    with pytest.raises(Unreadable, match="version"):
        ShardPlan.load(path)
    path.write_bytes(b"\xff\x00")
    with pytest.raises(Unreadable, match="_plan.json: not valid JSON .*; rebuild it"):
        ShardPlan.load(path, "rebuild it")


def test_parquet_features_skip_the_dictionary_and_keep_their_values(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests import write_parquet_atomic

    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "key": pa.array([f"k{i}" for i in range(50)]),
            "emb": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(50 * 8).astype(np.float16)), 8
            ),
            "sims": pa.array(
                [list(rng.random(3).astype(np.float32)) for _ in range(50)], pa.list_(pa.float32())
            ),
            "score": pa.array(rng.random(50)),
            "rows": pa.array(np.arange(50), pa.int64()),
        }
    )
    size, digest = write_parquet_atomic(tmp_path / "t.parquet", table)
    assert size == (tmp_path / "t.parquet").stat().st_size and len(digest) == 32
    assert pq.read_table(tmp_path / "t.parquet").equals(table)  # bit-exact, float16 included
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    for float_leaf in ("emb.list.element", "sims.list.element", "score"):
        assert "RLE_DICTIONARY" not in encodings[float_leaf]
    assert "BYTE_STREAM_SPLIT" in encodings["score"] and "BYTE_STREAM_SPLIT" in encodings["sims.list.element"]
    for other in ("key", "rows"):
        assert "RLE_DICTIONARY" in encodings[other]
    # the same table gives the same bytes (outputs stay byte-identical for identical inputs)
    assert write_parquet_atomic(tmp_path / "u.parquet", table)[1] == digest
