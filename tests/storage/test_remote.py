"""storage/remote.py on fsspec's in-memory filesystem: URLs told from paths, listings, fingerprints that
follow an object's bytes, streaming reads, and storage options that never show their values."""

from __future__ import annotations

import uuid

import pytest

from core.errors import ConfigError
from storage import remote


@pytest.fixture
def bucket():
    """A fresh folder on fsspec's memory:// filesystem, removed after the test."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"memory:///{uuid.uuid4().hex}"  # as fsspec spells its objects
    yield fs, root
    fs.rm(root, recursive=True)


def put(fs, url: str, data: bytes) -> None:
    with fs.open(url, "wb") as f:
        f.write(data)


@pytest.mark.parametrize(
    "path, url",
    [("s3://b/k.tar", True), ("gs://b/k", True), ("https://h/x.tar", True), ("file:///tmp/x", True),
     ("/tmp/x.tar", False), ("relative/x.tar", False), ("c:x", False)],
)  # fmt: skip
def test_urls_are_told_from_local_paths(path, url):
    assert remote.is_url(path) is url


def test_expand_names_objects_by_glob_folder_or_name_and_remembers_their_fingerprints(bucket):
    fs, root = bucket
    for name in ("a/1.tar", "a/2.tar", "a/sub/3.jpg", "b.parquet"):
        put(fs, f"{root}/{name}", name.encode())
    objects, folder = remote.expand(f"{root}/a/*.tar")
    assert list(objects) == [f"{root}/a/1.tar", f"{root}/a/2.tar"] and folder is None
    objects, folder = remote.expand(f"{root}/a")
    assert folder == f"{root}/a" and list(objects) == [
        f"{root}/a/1.tar",
        f"{root}/a/2.tar",
        f"{root}/a/sub/3.jpg",
    ]
    assert remote.expand(f"{root}/b.parquet")[0].keys() == {f"{root}/b.parquet"}
    assert remote.expand(f"{root}/nothing") == ({}, None)
    assert remote.size(f"{root}/a/1.tar") == len(b"a/1.tar") and remote.size(f"{root}/gone") is None


def test_a_rewritten_object_changes_its_digest_and_an_untouched_one_does_not(bucket):
    fs, root = bucket
    url = f"{root}/x.tar"
    put(fs, url, b"one")
    remote.expand(url)
    first, content = remote.digest_input(url, "x.tar"), remote.digest_input(url, "x.tar", content=True)
    remote.expand(url)  # listed again: same object
    assert remote.digest_input(url, "x.tar") == first
    put(fs, url, b"two")  # same size, new bytes
    remote.expand(url)
    assert remote.digest_input(url, "x.tar", content=True) != content
    assert remote.digest_input(url, "y.tar", content=True) != remote.digest_input(url, "x.tar", content=True)


def test_content_digests_agree_between_a_local_file_and_an_object(bucket, tmp_path):
    fs, root = bucket
    data = bytes(range(256)) * 4097  # more than one read block of the hash
    (tmp_path / "x.bin").write_bytes(data)
    put(fs, f"{root}/x.bin", data)
    assert remote.content_digest(f"{root}/x.bin") == remote.content_digest(tmp_path / "x.bin")
    with remote.open_read(f"{root}/x.bin") as f:
        assert f.read(5) == data[:5]


def test_storage_options_must_be_tables_and_errors_never_show_their_values():
    with pytest.raises(ConfigError, match="storage_options.s3 must be a table") as caught:
        remote.configure({"s3": "AKIA-SECRET"})
    assert "AKIA-SECRET" not in str(caught.value)


def test_a_missing_driver_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="nosuchproto"):
        remote.filesystem("nosuchproto://bucket/x.tar")
