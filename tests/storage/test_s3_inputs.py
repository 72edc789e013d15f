"""Inputs on a real S3 server (tests/storage/conftest.py): `pipeline embed` from s3:// tars, Parquet files
and image folders, `--captions` from s3://, reruns decided by each object's ETag, and pipeline.toml's
storage options, whose values never reach the cache."""

from __future__ import annotations

import io
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import RUN_CONFIG, embed_config, image_bytes
from typer.testing import CliRunner

from pipeline.embed.stage import run_embed


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """48 synthetic images in 3 tars, and 120 captions."""
    from world.synth import SynthConfig, run_synth

    root = tmp_path_factory.mktemp("s3world")
    run_synth(SynthConfig(out=root, n=48, shard_size=16, n_captions=120, image_size=32))
    return root


def rows(cache, shard: int) -> dict:
    """An embed sidecar's rows but their `source` (which names the input's path or URL)."""
    table = pq.read_table(cache / "embed" / f"{shard:05d}.parquet")
    return table.drop_columns(["source"]).to_pydict()


def first_members(path, n: int) -> bytes:
    """A tar of the first n members of `path`."""
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers()[:n]:
            dst.addfile(member, src.extractfile(member))
    return out.getvalue()


def test_embed_from_s3_tars_equals_embed_from_local_ones_and_reruns_only_a_changed_object(
    s3, world, tmp_path
):
    fs, bucket = s3
    fs.put(f"{world}/", f"{bucket}/world/", recursive=True)
    local = run_embed(embed_config([f"{world}/*.tar"], tmp_path / "local"))
    config = embed_config([f"{bucket}/world/{{00000..00002}}.tar"], tmp_path / "cache")
    first = run_embed(config)
    assert first.shards_run == [0, 1, 2] and first.rows_written == local.rows_written == 48
    assert all(rows(tmp_path / "cache", s) == rows(tmp_path / "local", s) for s in range(3))
    source = pq.read_table(tmp_path / "cache" / "embed" / "00001.parquet")["source"][0].as_py()
    assert source.startswith(f"{bucket}/world/00001.tar#")

    assert run_embed(config).shards_run == []  # one listing, no object changed
    fs.pipe(f"{bucket}/world/00001.tar", first_members(world / "00001.tar", 3 * 8))  # 8 samples of 16
    changed = run_embed(embed_config(config.inputs, config.cache, workers=2))  # read by forked decoders
    assert changed.shards_run == [1] and changed.rows_written == 8
    assert run_embed(embed_config(config.inputs, config.cache, verify=True)).shards_run == []


def test_parquet_files_and_image_folders_in_a_bucket_are_embedded_like_local_ones(s3, tmp_path):
    fs, bucket = s3
    images = [image_bytes((30 * i, 90, 200)) for i in range(5)]
    table = pa.table(
        {"key": [f"k{i}" for i in range(5)], "jpg": images, "caption": [f"c{i}" for i in range(5)]}
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs.pipe(f"{bucket}/rows.parquet", buffer.getvalue())
    for i, data in enumerate(images[:3]):
        fs.pipe(f"{bucket}/folder/sub/img{i}.jpg", data)
    fs.pipe(f"{bucket}/folder/sub/img0.txt", b"a blue picture\n")
    fs.pipe(f"{bucket}/folder/.hidden/skip.jpg", images[0])
    result = run_embed(embed_config([f"{bucket}/rows.parquet", f"{bucket}/folder"], tmp_path / "cache"))
    assert result.rows_written == 8
    written = [rows(tmp_path / "cache", s) for s in result.shards_run]
    captions = {k: c for r in written for k, c in zip(r["key"], r["caption"], strict=True)}
    assert sorted(captions) == sorted([f"k{i}" for i in range(5)] + [f"sub/img{i}" for i in range(3)])
    assert captions["sub/img0"] == "a blue picture" and captions["k3"] == "c3"


def test_a_whole_pipeline_reads_its_inputs_and_corpus_from_s3_with_the_options_of_pipeline_toml(
    s3, s3_endpoint, world, tmp_path, monkeypatch
):
    """Credentials and endpoint from pipeline.toml only (no environment): the run works, its rerun does
    nothing, `pipeline status` sees a changed corpus object, and no option value is written to the cache."""
    import fsspec.config

    from cli.pipeline import app

    fs, bucket = s3
    fs.put(f"{world}/", f"{bucket}/world/", recursive=True)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    toml = RUN_CONFIG.replace('"world/*.tar"', f'"{bucket}/world/*.tar"')
    toml = toml.replace('"world/captions.parquet"', f'"{bucket}/world/captions.parquet"')
    secret = "testing-secret-value"
    toml += f'[storage_options.s3]\nendpoint_url = "{s3_endpoint}"\nkey = "testing"\nsecret = "{secret}"\n'
    (tmp_path / "pipeline.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    first = runner.invoke(app, ["run"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["run"])
    assert again.exit_code == 0, again.output
    made = [line for line in again.output.splitlines() if "shard(s) made" in line]
    assert made and all(": 0 shard(s) made" in line for line in made), again.output
    fewer = io.BytesIO()
    pq.write_table(pq.read_table(world / "captions.parquet").slice(1), fewer)
    fs.pipe(f"{bucket}/world/captions.parquet", fewer.getvalue())  # rewritten: one caption fewer
    status = runner.invoke(app, ["status"])
    assert "corpus changed" in status.output, status.output
    for folder, _, files in os.walk(tmp_path / "cache"):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert secret.encode() not in f.read(), name


@pytest.fixture
def s3_requests(monkeypatch):
    """The S3 API calls s3fs makes in this process, by name, in order."""
    import s3fs

    calls: list[str] = []
    call = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls.append(method if isinstance(method, str) else method.__name__)
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    return calls


def test_judging_a_cache_of_many_s3_shards_is_one_listing_not_a_request_per_object(s3, s3_requests, tmp_path):
    from pipeline.embed.stage import plan_embed

    fs, bucket = s3
    for i in range(40):
        fs.pipe(f"{bucket}/many/{i:05d}.tar", b"")
    for pattern in (f"{bucket}/many/{{00000..00039}}.tar", f"{bucket}/many/*.tar"):
        s3_requests.clear()
        plan = plan_embed(embed_config([pattern], tmp_path / "cache"), write_plan=False)
        assert len(plan.tasks) == 40, pattern
        assert s3_requests == ["list_objects_v2"], (pattern, s3_requests)  # the objects' ETags come with it


def test_reading_a_bucket_folder_of_images_asks_nothing_per_missing_caption_file(s3, s3_requests, tmp_path):
    fs, bucket = s3
    for i in range(6):
        fs.pipe(f"{bucket}/photos/img{i}.jpg", image_bytes((40 * i, 90, 200)))
    fs.pipe(f"{bucket}/photos/img0.txt", b"a caption\n")
    s3_requests.clear()
    result = run_embed(embed_config([f"{bucket}/photos"], tmp_path / "cache"))
    assert result.rows_written == 6
    assert s3_requests.count("head_object") <= 1, s3_requests  # is the folder an object? then listings
    assert s3_requests.count("get_object") == 6 + 1 + 6, (
        s3_requests
    )  # the images read, a caption, the images hashed
