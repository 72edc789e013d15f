"""`pipeline embed`: outputs, every kind of bad input, incremental reruns and crash safety."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from factories import TINY_CLIP, embed_config, image_bytes, write_tar
from PIL import Image

from core.errors import ConfigError
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import run_embed


def _config(inputs, cache, **kw) -> EmbedConfig:
    return embed_config(inputs, cache, **kw)


def _read_tar(path):
    samples = {}
    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        samples[sample["__key__"]] = sample
    return samples


def _sidecar(cache, shard=0):
    return pq.read_table(cache / "embed" / f"{shard:05d}.parquet")


def _stats(cache, shard=0):
    return json.loads((cache / "embed" / "_stats" / f"{shard:05d}.json").read_text())


def test_folder_outputs_read_back_with_webdataset_and_pyarrow(image_folder, tmp_path):
    cache = tmp_path / "cache"
    result = run_embed(_config([image_folder], cache))
    assert result.rows_written == 6 and result.dropped == {}
    samples = _read_tar(cache / "embed" / "00000.tar")
    table = _sidecar(cache)
    keys = table.column("key").to_pylist()
    assert keys == ["a/img0", "a/img1", "a/img2", "b/pic0", "b/pic1", "b/pic2"]
    assert sorted(samples) == sorted(keys)
    assert table.schema.field("img_emb").type == pa.list_(pa.float16(), 64)
    embs = np.stack(table.column("img_emb").to_numpy(zero_copy_only=False))
    assert embs.dtype == np.float16 and embs.shape == (6, 64)
    np.testing.assert_allclose(np.linalg.norm(embs.astype(np.float32), axis=1), 1.0, atol=2e-3)
    for key, emb in zip(keys, embs, strict=True):
        sample = samples[key]
        npy = np.load(io.BytesIO(sample["img_emb.npy"]))
        assert npy.dtype == np.float16 and npy.shape == (64,)
        np.testing.assert_array_equal(npy, emb)
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert img.size == (32, 32)
        meta = json.loads(sample["json"])
        assert meta["source"].endswith(key + (".jpg" if key.startswith("a") else ".PNG"))
    meta0 = json.loads(samples["a/img0"]["json"])
    assert meta0["caption"] == "a blue picture" and (meta0["width"], meta0["height"]) == (48, 40)
    assert table.column("caption").to_pylist()[0] == "a blue picture"
    assert table.column("caption").to_pylist()[1] is None


def test_webdataset_tars_keep_captions_and_labels(tmp_path):
    members = []
    for i in range(5):
        members += [
            (f"{i:09d}.jpg", image_bytes((50 * i, 80, 80), size=(32, 32))),
            (f"{i:09d}.txt", f"caption {i}".encode()),
            (f"{i:09d}.json", json.dumps({"objects": [{"shape": "circle"}]}).encode()),
        ]
    shard_a = write_tar(tmp_path / "00000.tar", members[:9])
    write_tar(tmp_path / "00001.tar", members[9:])
    cache = tmp_path / "cache"
    result = run_embed(_config([str(tmp_path / "{00000..00001}.tar")], cache))
    assert result.shards_run == [0, 1] and result.rows_written == 5
    assert _sidecar(cache, 0).column("key").to_pylist() == ["000000000", "000000001", "000000002"]
    table = _sidecar(cache, 1)
    assert table.column("caption").to_pylist() == ["caption 3", "caption 4"]
    assert json.loads(table.column("labels")[0].as_py()) == {"objects": [{"shape": "circle"}]}
    # a 32x32 JPEG source at the target size is stored byte for byte
    stored = _read_tar(cache / "embed" / "00000.tar")["000000000"]["jpg"]
    assert stored == members[0][1]
    assert shard_a.exists()


def test_parquet_with_image_bytes_column(tmp_path):
    images = [image_bytes((30 * i, 60, 90)) for i in range(4)]
    table = pa.table(
        {
            "id": ["x", "y", "z", "w"],
            "image": [{"bytes": b, "path": None} for b in images[:2]]
            + [{"bytes": images[2], "path": None}, {"bytes": None, "path": None}],
            "text": ["p", "q", "r", "s"],
        }
    )
    pq.write_table(table, tmp_path / "imgs.parquet")
    cache = tmp_path / "cache"
    result = run_embed(_config([tmp_path / "imgs.parquet"], cache))
    assert result.rows_written == 3 and result.dropped == {"empty": 1}
    side = _sidecar(cache)
    assert side.column("key").to_pylist() == ["x", "y", "z"]
    assert side.column("caption").to_pylist() == ["p", "q", "r"]


def test_parquet_without_image_column_is_a_config_error(tmp_path):
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match="no image-bytes column"):
        run_embed(_config([tmp_path / "t.parquet"], tmp_path / "cache"))


def _bad_folder(root):
    root.mkdir()
    good = image_bytes((10, 200, 10))
    (root / "good.jpg").write_bytes(good)
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    whole = image_bytes((1, 2, 3), size=(64, 64), quality=95)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    (root / "really_png.jpg").write_bytes(image_bytes((9, 9, 200), fmt="PNG"))  # wrong extension
    (root / "cmyk.jpg").write_bytes(image_bytes((200, 100, 0), mode="CMYK"))
    (root / "grey.png").write_bytes(image_bytes((128, 128, 128), fmt="PNG", mode="L"))
    (root / "palette.png").write_bytes(image_bytes((0, 50, 250), fmt="PNG", mode="P"))
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[:, :15] = (0, 250, 50, 255)  # left half opaque green, right half fully transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="WEBP", lossless=True)
    (root / "alpha.webp").write_bytes(buf.getvalue())
    deep = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    (root / "deep16.png").write_bytes(buf.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(buf, format="JPEG", exif=exif)
    (root / "rotated.jpg").write_bytes(buf.getvalue())
    (root / "huge.bmp").write_bytes(image_bytes((5, 5, 5), size=(300, 300), fmt="BMP"))
    (root / "dup.jpg").write_bytes(good)
    (root / "dup.png").write_bytes(image_bytes((10, 200, 10), fmt="PNG"))  # same key as dup.jpg
    return root


def test_every_bad_image_is_converted_or_skipped_and_counted(tmp_path):
    root = _bad_folder(tmp_path / "bad")
    cache = tmp_path / "cache"
    result = run_embed(_config([root], cache, max_pixels=200 * 200))
    stats = _stats(cache)
    assert stats["dropped"] == {"empty": 1, "too_many_pixels": 1, "truncated": 1, "undecodable": 1}
    assert result.dropped == {"duplicate_key": 1, **stats["dropped"]}  # dup.png dropped when planning
    keys = set(_sidecar(cache).column("key").to_pylist())
    assert keys == {"good", "really_png", "cmyk", "grey", "palette", "alpha", "deep16", "rotated", "dup"}
    converted = stats["converted"]
    for label in ("cmyk", "greyscale", "palette", "alpha", "16bit", "exif_rotated"):
        assert converted.get(label, 0) >= 1, (label, converted)
    samples = _read_tar(cache / "embed" / "00000.tar")
    rotated = json.loads(samples["rotated"]["json"])
    assert (rotated["width"], rotated["height"]) == (20, 40)  # EXIF orientation applied
    alpha = np.asarray(Image.open(io.BytesIO(samples["alpha"]["jpg"])))
    assert alpha.shape == (32, 32, 3)


def test_extreme_aspect_images_are_dropped_and_counted_not_blown_up(tmp_path):
    root = tmp_path / "thin"
    root.mkdir()
    (root / "good.jpg").write_bytes(image_bytes((10, 200, 10)))
    (root / "tall.png").write_bytes(image_bytes((200, 10, 10), size=(1, 60_000), fmt="PNG"))
    (root / "wide.png").write_bytes(image_bytes((10, 10, 200), size=(60_000, 1), fmt="PNG"))
    cache = tmp_path / "cache"
    result = run_embed(_config([root], cache))
    stats = _stats(cache)
    assert stats["dropped"] == {"extreme_aspect": 2} and result.dropped == {"extreme_aspect": 2}
    assert stats["dropped_sources"] == {"extreme_aspect": [str(root / "tall.png"), str(root / "wide.png")]}
    assert _sidecar(cache).column("key").to_pylist() == ["good"]
    # at its default the limit is not keyed: caches made before the option stay up to date
    manifest = json.loads((cache / "embed" / "_manifests" / "00000.json").read_text())
    assert "max_aspect" not in manifest["params"]
    assert run_embed(_config([root], cache)).shards_run == []
    wider = run_embed(_config([root], cache, max_aspect=60_000))
    assert wider.shards_run == [0] and wider.dropped == {}
    assert _sidecar(cache).column("key").to_pylist() == ["good", "tall", "wide"]
    with pytest.raises(ConfigError, match="--max-aspect must be a finite number of at least 1"):
        run_embed(_config([root], cache, max_aspect=0.5))


def test_unsafe_and_duplicate_tar_members_are_skipped_and_counted(tmp_path):
    img = image_bytes()
    tar_path = write_tar(
        tmp_path / "evil.tar",
        [
            ("000.jpg", img),
            ("/etc/passwd.jpg", img),
            ("../escape.jpg", img),
            ("a/../../b.jpg", img),
            ("001.jpg", img),
            ("001.txt", b"only a caption"),
            ("002.txt", b"no image"),
            ("000.jpg", img),
        ],
    )
    cache = tmp_path / "cache"
    run_embed(_config([tar_path], cache))
    stats = _stats(cache)
    assert stats["dropped"] == {"duplicate_key": 1, "no_image_in_sample": 1, "unsafe_tar_member": 3}
    assert _sidecar(cache).column("key").to_pylist() == ["000", "001"]


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    members = [(f"{i:03d}.jpg", image_bytes((i * 20, 0, 0), size=(64, 64))) for i in range(6)]
    full = write_tar(tmp_path / "full.tar", members).read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[: len(full) // 2])
    cache = tmp_path / "cache"
    run_embed(_config([tmp_path / "cut.tar"], cache))
    stats = _stats(cache)
    assert stats["dropped"].get("corrupt_tar") == 1
    assert 1 <= stats["written"] < 6
    assert _sidecar(cache).column("key").to_pylist() == [f"{i:03d}" for i in range(stats["written"])]


def test_missing_and_empty_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        run_embed(_config([tmp_path / "nope"], tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images found"):
        run_embed(_config([tmp_path / "empty"], tmp_path / "cache"))
    with pytest.raises(ConfigError, match="--image-size"):
        run_embed(_config([tmp_path / "empty"], tmp_path / "cache", image_size=-1))


def _outputs(cache):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((cache / "embed").glob("0*"))}


def test_incremental_reruns_do_only_what_changed(image_folder, tmp_path):
    cache = tmp_path / "cache"
    cfg = _config([image_folder], cache, shard_size=3)
    first = run_embed(cfg)
    assert first.shards_run == [0, 1]
    before = _outputs(cache)

    noop = run_embed(cfg)
    assert noop.shards_run == [] and noop.shards_up_to_date == [0, 1]
    assert _outputs(cache) == before  # not even rewritten

    (image_folder / "c").mkdir()
    (image_folder / "c" / "new.jpg").write_bytes(image_bytes((1, 1, 1)))
    appended = run_embed(cfg)
    assert appended.shards_run == [2] and appended.rows_written == 1

    changed = image_folder / "b" / "pic1.PNG"
    changed.write_bytes(image_bytes((255, 255, 0), fmt="PNG"))
    rerun = run_embed(cfg)
    assert rerun.shards_run == [1]
    assert _outputs(cache)["00000.tar"] == before["00000.tar"]

    (image_folder / "a" / "img1.jpg").unlink()
    removed = run_embed(cfg)
    assert removed.shards_run == [0]
    assert _sidecar(cache, 0).column("key").to_pylist() == ["a/img0", "a/img2"]

    resized = run_embed(_config([image_folder], cache, shard_size=3, image_size=16))
    assert resized.shards_run == [0, 1, 2]
    assert run_embed(_config([image_folder], cache, shard_size=3, image_size=16, force=True)).shards_run == [
        0,
        1,
        2,
    ]


def test_unkeyed_params_do_not_stale(image_folder, tmp_path):
    cache = tmp_path / "cache"
    run_embed(_config([image_folder], cache))
    again = EmbedConfig(
        inputs=(str(image_folder),),
        cache=cache,
        clip_model=TINY_CLIP,
        clip_pretrained="",
        image_size=32,
        workers=2,
        batch_size=5,
    )
    assert run_embed(again).shards_run == []


def test_verify_notices_content_change_that_keeps_size_and_mtime(image_folder, tmp_path):
    cache = tmp_path / "cache"
    cfg = _config([image_folder], cache)
    run_embed(cfg)
    target = image_folder / "a" / "img2.jpg"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF  # same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_embed(cfg).shards_run == []  # size + mtime cannot see it
    assert run_embed(_config([image_folder], cache, verify=True)).shards_run == [0]


def test_same_inputs_give_identical_bytes(image_folder, tmp_path):
    run_embed(_config([image_folder], tmp_path / "c1"))
    run_embed(
        _config(
            [image_folder],
            tmp_path / "c2",
        )
    )
    for name in ("00000.tar", "00000.parquet"):
        assert (tmp_path / "c1" / "embed" / name).read_bytes() == (
            tmp_path / "c2" / "embed" / name
        ).read_bytes()


def test_crash_between_data_and_manifest_is_completed_by_a_rerun(image_folder, tmp_path, monkeypatch):
    import pipeline.embed.stage as embed_mod

    cache = tmp_path / "cache"
    cfg = _config([image_folder], cache, shard_size=3)
    real_commit = embed_mod.commit_manifest
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after the data files, before the manifest")
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(embed_mod, "commit_manifest", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_embed(cfg)
    monkeypatch.setattr(embed_mod, "commit_manifest", real_commit)
    assert (cache / "embed" / "00001.tar").exists()  # data written, but no manifest: not committed
    rerun = run_embed(cfg)
    assert rerun.shards_run == [1]
    run_embed(_config([image_folder], tmp_path / "clean", shard_size=3))
    for name in ("00000.parquet", "00001.parquet", "00001.tar"):
        assert (cache / "embed" / name).read_bytes() == (tmp_path / "clean" / "embed" / name).read_bytes()


def test_crash_while_writing_leaves_no_partial_file(image_folder, tmp_path, monkeypatch):
    from pipeline.embed import writer as embed_writer

    cache = tmp_path / "cache"
    real_write = embed_writer.EmbedShardWriter.write
    count = []

    def crash_mid_shard(self, *args, **kwargs):
        count.append(1)
        if len(count) == 4:
            raise KeyboardInterrupt("killed mid-shard")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(embed_writer.EmbedShardWriter, "write", crash_mid_shard)
    with pytest.raises(KeyboardInterrupt):
        run_embed(_config([image_folder], cache))
    assert sorted(p.name for p in (cache / "embed").iterdir()) == ["_inputs.json", "_plan.json"]
    monkeypatch.setattr(embed_writer.EmbedShardWriter, "write", real_write)
    assert run_embed(_config([image_folder], cache)).rows_written == 6


def test_tar_is_a_valid_plain_tar(image_folder, tmp_path):
    cache = tmp_path / "cache"
    run_embed(_config([image_folder], cache))
    with tarfile.open(cache / "embed" / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["a/img0.jpg", "a/img0.img_emb.npy", "a/img0.json"]
