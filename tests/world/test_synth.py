"""Tests for the synthetic world (world/synth.py): determinism, labels, captions, shards, corpus."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import ConfigError
from world import grammar, synth

N, SHARD_SIZE, IMAGE_SIZE, N_CAPTIONS = 40, 16, 32, 400


def small_config(out: Path, **overrides) -> synth.SynthConfig:
    """The full-caption world (the former default; the partial world's tests are below)."""
    values = dict(out=out, n=N, seed=0, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE, n_captions=N_CAPTIONS)
    values["caption_style"] = "full"
    values.update(overrides)
    return synth.SynthConfig(**values)


def read_samples(shards: list[Path]) -> dict[str, dict[str, bytes]]:
    """All samples of the shards as {key: {extension: bytes}}, read with webdataset itself."""
    import webdataset as wds

    samples = {}
    for sample in wds.WebDataset([str(p) for p in shards], shardshuffle=False):
        key = sample["__key__"]
        assert key not in samples, f"duplicate key {key}"
        samples[key] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return samples


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[synth.SynthResult, dict[str, dict[str, bytes]]]:
    result = synth.run_synth(small_config(tmp_path_factory.mktemp("world")))
    return result, read_samples(result.shards)


def test_same_config_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first = synth.run_synth(small_config(tmp_path / "a", n=24, shard_size=10, n_captions=100))
    synth.run_synth(small_config(tmp_path / "b", n=24, shard_size=10, n_captions=100))
    synth.run_synth(small_config(tmp_path / "c", n=24, shard_size=10, n_captions=100, seed=1))
    a, b, c = (file_bytes(tmp_path / d) for d in "abc")
    assert sorted(a) == ["00000.tar", "00001.tar", "00002.tar", "captions.parquet", "captions.txt"]
    assert a == b
    assert sorted(c) == sorted(a)  # no temp files left behind
    for name in a:
        assert a[name] != c[name], name
    assert [p.name for p in first.shards] == ["00000.tar", "00001.tar", "00002.tar"]


def test_rerun_into_same_directory_reproduces_bytes(tmp_path: Path) -> None:
    config = small_config(tmp_path, n=12, shard_size=5, n_captions=50)
    synth.run_synth(config)
    before = file_bytes(tmp_path)
    synth.run_synth(config)
    assert file_bytes(tmp_path) == before


def test_shards_read_back_with_webdataset(world) -> None:
    result, samples = world
    assert len(result.shards) == math.ceil(N / SHARD_SIZE)
    assert sorted(samples) == [f"{i:09d}" for i in range(N)]
    for key, sample in samples.items():
        assert set(sample) == {"jpg", "txt", "json"}, key
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG"
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert image.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))
    assert result.n_images == N
    assert result.n_objects == sum(len(json.loads(s["json"])["objects"]) for s in samples.values())


def test_tar_members_have_fixed_metadata(world) -> None:
    import tarfile

    result, _ = world
    with tarfile.open(result.shards[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644), m.name


def test_every_image_caption_parses_back_to_its_labels(world) -> None:
    _, samples = world
    for key, sample in samples.items():
        labels = json.loads(sample["json"])
        caption = sample["txt"].decode("utf-8")
        assert caption == labels["caption"]
        assert set(labels) == {"objects", "boxes", "background", "caption"}
        parsed = grammar.parse_caption(caption)
        assert all(set(obj) == set(grammar.ATTRIBUTES) for obj in parsed), (key, caption, parsed)
        assert grammar.objects_match(parsed, labels["objects"]), (
            key,
            caption,
            parsed,
            labels["objects"],
        )


def test_parse_caption_is_exact_on_many_generated_captions() -> None:
    # Caption text only (no rendering), so thousands of template/synonym draws stay fast.
    for index in range(3000):
        scene = synth.sample_scene(7, index)
        parsed = grammar.parse_caption(scene.caption)
        assert grammar.objects_match(parsed, scene.objects), (scene.caption, parsed, scene.objects)
    for caption in grammar.caption_corpus(7, 3000):
        parsed = grammar.parse_caption(caption)
        assert 1 <= len(parsed) <= 2 and all(len(obj) == 4 for obj in parsed), (caption, parsed)


@pytest.mark.parametrize(
    "attribute,value,phrase",
    [(a, v, p) for a, table in grammar.SYNONYMS.items() for v, words in table.items() for p in words]
    + [("position", v, p) for v, words in grammar.POSITION_HEADINGS.items() for p in words],
)
def test_every_synonym_parses_to_its_value(attribute: str, value: str, phrase: str) -> None:
    assert grammar.parse_caption(phrase) == [{attribute: value}]
    assert grammar.parse_caption(f"Look: {phrase.upper()}!") == [{attribute: value}]


def test_captions_use_synonyms_and_varied_word_order() -> None:
    captions = grammar.caption_corpus(0, 4000)
    assert len(set(captions)) > 0.95 * len(captions)
    words = {w for c in captions for w in c.lower().replace(",", " ").replace(":", " ").split()}
    for table in (grammar.SYNONYMS["colour"], grammar.SYNONYMS["size"]):
        for synonyms in table.values():
            assert set(synonyms) <= words
    # The position is sometimes the first thing said and sometimes the last.
    first_words = {c.split()[0].lower().rstrip(":,") for c in captions}
    assert {"on", "left", "there", "a"} <= first_words
    assert any(c.endswith(("left", "right", "top", "bottom", "centre", "center", "middle")) for c in captions)


def test_held_out_pairs_never_in_images_but_in_corpus(world) -> None:
    import pyarrow.parquet as pq

    result, samples = world
    assert len(grammar.HELD_OUT_PAIRS) == 4
    image_objects = [o for s in samples.values() for o in json.loads(s["json"])["objects"]]
    image_objects += [o for i in range(3000) for o in synth.sample_scene(0, i).objects]
    image_pairs = {(o["colour"], o["shape"]) for o in image_objects}
    assert image_pairs.isdisjoint(grammar.HELD_OUT_PAIRS)
    assert image_pairs == set(grammar.IMAGE_PAIRS)  # every other pair does occur

    table = pq.read_table(result.captions_parquet)
    assert table.schema.names == ["caption"] and str(table.schema.field("caption").type) == "string"
    corpus = table.column("caption").to_pylist()
    assert corpus == result.captions_txt.read_text(encoding="utf-8").splitlines()
    assert len(corpus) == result.n_captions == N_CAPTIONS
    corpus_pairs = {(o["colour"], o["shape"]) for c in corpus for o in grammar.parse_caption(c)}
    assert set(grammar.HELD_OUT_PAIRS) <= corpus_pairs
    assert corpus_pairs == set(itertools.product(grammar.COLOURS, grammar.SHAPES))


def test_corpus_covers_every_single_object_combination() -> None:
    combos = {tuple(o[a] for a in grammar.ATTRIBUTES) for c in grammar.caption_corpus(3, 360) for o in
              grammar.parse_caption(c)}  # fmt: skip
    expected = set(itertools.product(grammar.SHAPES, grammar.COLOURS, grammar.SIZES, grammar.POSITIONS))
    assert expected <= combos
    # Any 36 consecutive captions cover every colour-shape pair, so a small --n-captions still has them all.
    first = {
        (o["colour"], o["shape"]) for c in grammar.caption_corpus(3, 36) for o in grammar.parse_caption(c)
    }
    assert first == set(itertools.product(grammar.COLOURS, grammar.SHAPES))


def test_corpus_and_images_use_independent_random_streams(tmp_path: Path) -> None:
    base = synth.run_synth(small_config(tmp_path / "base", n=12, n_captions=50))
    more_captions = synth.run_synth(small_config(tmp_path / "captions", n=12, n_captions=80))
    more_images = synth.run_synth(small_config(tmp_path / "images", n=20, n_captions=50))
    assert base.shards[0].read_bytes() == more_captions.shards[0].read_bytes()
    assert base.captions_txt.read_bytes() == more_images.captions_txt.read_bytes()
    image_captions = [synth.sample_scene(0, i).caption for i in range(50)]
    assert image_captions != base.captions_txt.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize(
    "text",
    ["", "   ", "🙂🙂", "\x00\n\t", "the quick brown fox", "42", "red red red red red", "left right top",
     "a big red", "circle" * 1000, "plus plus plus", "Ünïcödé square — ½", "on the", "in the upper"],
)  # fmt: skip
def test_parse_caption_never_crashes_on_other_text(text: str) -> None:
    parsed = grammar.parse_caption(text)
    assert isinstance(parsed, list)
    vocabulary = {
        "shape": grammar.SHAPES,
        "colour": grammar.COLOURS,
        "size": grammar.SIZES,
        "position": grammar.POSITIONS,
    }
    for obj in parsed:
        assert obj and set(obj) <= set(grammar.ATTRIBUTES)
        assert all(value in vocabulary[attr] for attr, value in obj.items())


def test_parse_caption_unknown_and_partial_text() -> None:
    assert grammar.parse_caption("the quick brown fox") == []
    assert grammar.parse_caption(None) == []  # type: ignore[arg-type]
    assert grammar.parse_caption("a big red thing") == [{"size": "large", "colour": "red"}]
    assert grammar.parse_caption("red red") == [{"colour": "red"}, {"colour": "red"}]


def test_labels_match_and_objects_match() -> None:
    a = {"shape": "star", "colour": "red", "size": "small", "position": "left"}
    b = {"shape": "star", "colour": "blue", "size": "small", "position": "top"}
    assert grammar.labels_match(a, b, "shape") and not grammar.labels_match(a, b, "colour")
    assert not grammar.labels_match({}, {}, "shape")
    assert grammar.objects_match([a, b], [b, a]) and not grammar.objects_match([a, b], [a, a])


@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("n", 0, "--n"),
        ("n", 10**9, "--n"),
        ("seed", -1, "--seed"),
        ("image_size", 8, "--image-size"),
        ("image_size", 2048, "--image-size"),
        ("image_size", 64.0, "--image-size"),
        ("max_objects", 0, "--max-objects"),
        ("max_objects", 3, "--max-objects"),
        ("shard_size", 0, "--shard-size"),
        ("n_captions", 10, "--n-captions"),
    ],
)
def test_validate_rejects_bad_values(tmp_path: Path, field: str, value: object, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        small_config(tmp_path, **{field: value}).validate()
    with pytest.raises(ConfigError, match=flag):
        synth.run_synth(small_config(tmp_path / "never", **{field: value}))
    assert not (tmp_path / "never").exists()  # validated before any work


def test_validate_rejects_too_many_shards_a_file_as_out_and_stale_shards(tmp_path: Path) -> None:
    small_config(tmp_path).validate()  # the defaults of the tests are fine
    with pytest.raises(ConfigError, match="--shard-size"):
        small_config(tmp_path, n=200_001, shard_size=2).validate()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out"):
        small_config(tmp_path / "file").validate()
    synth.run_synth(small_config(tmp_path / "run", n=10, shard_size=5, n_captions=40))
    with pytest.raises(ConfigError, match="--out"):
        small_config(tmp_path / "run", n=5, shard_size=5, n_captions=40).validate()
    small_config(tmp_path / "run", n=10, shard_size=5, n_captions=40).validate()  # same run again is fine


def test_max_objects_one_gives_one_object_per_image(tmp_path: Path) -> None:
    result = synth.run_synth(small_config(tmp_path, n=30, max_objects=1, n_captions=60))
    samples = read_samples(result.shards)
    assert len(samples) == 30
    assert all(len(json.loads(s["json"])["objects"]) == 1 for s in samples.values())
    corpus = result.captions_txt.read_text(encoding="utf-8").splitlines()
    assert all(len(grammar.parse_caption(c)) == 1 for c in corpus)
    assert all(len(synth.sample_scene(0, i, max_objects=1).objects) == 1 for i in range(500))


def test_two_objects_sit_at_distinct_positions_and_never_overlap() -> None:
    counts = {1: 0, 2: 0}
    for index in range(3000):
        scene = synth.sample_scene(0, index)
        counts[len(scene.objects)] += 1
        for x0, y0, x1, y1 in scene.boxes:
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        if len(scene.objects) == 2:
            assert scene.objects[0]["position"] != scene.objects[1]["position"]
            (a0, b0, a1, b1), (c0, d0, c1, d1) = scene.boxes
            gap = max(c0 - a1, a0 - c1, d0 - b1, b0 - d1)  # > 0: separated along x or y
            assert gap >= 0.009, (scene, gap)  # about 0.6 px at 64 px (boxes are rounded to 4 decimals)
    assert min(counts.values()) > 1200  # both counts are common


def test_objects_are_visible_in_their_true_colour() -> None:
    # Decode the JPEG as the trainers will; the object's centre must show its colour and stand out from
    # the background, for every colour on both light and dark backgrounds.
    seen = set()
    for index in range(60):
        sample = synth.make_sample(0, index, image_size=64)
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
        corner = pixels[1, 1]
        labels = sample["json"]
        for obj, (x0, y0, x1, y1) in zip(labels["objects"], labels["boxes"], strict=True):
            cx, cy = round((x0 + x1) / 2 * 64 - 0.5), round((y0 + y1) / 2 * 64 - 0.5)
            centre = np.median(pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3), axis=0)
            target = np.array(synth.COLOUR_RGB[obj["colour"]], dtype=np.float32)
            assert np.abs(centre - target).max() < 40, (index, obj, centre, target)
            assert np.abs(centre - corner).max() > 80, (index, obj, centre, corner)
            seen.add((obj["colour"], labels["background"]["tone"]))
    assert len(seen) >= 10


def test_sizes_are_distinct_and_large_enough_at_64_px() -> None:
    for index in range(500):
        scene = synth.sample_scene(0, index)
        for obj, (x0, _, x1, _) in zip(scene.objects, scene.boxes, strict=True):
            width_px = (x1 - x0) * 64
            if obj["size"] == "small":
                assert 10 <= width_px <= 12.5, (obj, width_px)
            else:
                assert 17 <= width_px <= 20, (obj, width_px)


def test_progress_reports_every_image(tmp_path: Path) -> None:
    done: list[int] = []
    synth.run_synth(small_config(tmp_path, n=11, shard_size=4, n_captions=40), progress=done.append)
    assert done == list(range(1, 12))


# ---------------------------------------------------------------------------------------------------------
# The partial-caption world (the default)
# ---------------------------------------------------------------------------------------------------------


def partial_config(out: Path, **overrides) -> synth.SynthConfig:
    return synth.SynthConfig(**{**dict(out=out, n=N, seed=0, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE,
                                       n_captions=N_CAPTIONS), **overrides})  # fmt: skip


def test_the_default_world_is_partial_with_five_captions_per_image() -> None:
    config = synth.SynthConfig(out=Path("x"))
    assert (config.caption_style, config.per_image) == ("partial", 5)
    assert synth.SynthConfig(out=Path("x"), caption_style="full").per_image == 1


def test_partial_world_captions_name_nonempty_subsets_of_true_attributes(tmp_path: Path) -> None:
    result = synth.run_synth(partial_config(tmp_path, max_objects=2, captions_per_image=4))
    samples = read_samples(result.shards)
    assert len(samples) == N
    named_counts = set()
    for key, sample in samples.items():
        labels = json.loads(sample["json"])
        captions = labels["captions"]
        assert len(captions) == 4 and captions[0] == labels["caption"] == sample["txt"].decode("utf-8")
        for caption in captions:
            parsed = grammar.parse_caption(caption)
            assert len(parsed) == len(labels["objects"]), (key, caption)
            for obj in parsed:
                assert obj, (key, caption)  # every object names at least one attribute
                named_counts.add(len(obj))
                # ...each a true attribute of one of the image's objects
                assert any(all(truth.get(a) == v for a, v in obj.items()) for truth in labels["objects"]), (
                    key,
                    caption,
                )
    assert named_counts == {1, 2, 3, 4}  # from one attribute to all four


def test_partial_world_is_deterministic_and_its_images_are_the_full_worlds(tmp_path: Path) -> None:
    synth.run_synth(partial_config(tmp_path / "a", n=12, shard_size=6, n_captions=60))
    synth.run_synth(partial_config(tmp_path / "b", n=12, shard_size=6, n_captions=60))
    synth.run_synth(partial_config(tmp_path / "c", n=12, shard_size=6, n_captions=60, seed=1))
    synth.run_synth(small_config(tmp_path / "full", n=12, shard_size=6, n_captions=60))
    a, b, c = (file_bytes(tmp_path / d) for d in "abc")
    assert a == b and all(a[name] != c[name] for name in a)
    partial, full = (
        read_samples([tmp_path / "a" / "00000.tar"]),
        read_samples([tmp_path / "full" / "00000.tar"]),
    )
    assert all(partial[k]["jpg"] == full[k]["jpg"] for k in full)  # same images, other captions
    assert any(partial[k]["txt"] != full[k]["txt"] for k in full)


def test_partial_corpus_names_nonempty_subsets_and_covers_every_pair() -> None:
    corpus = grammar.caption_corpus(seed=0, n_captions=720, max_objects=2, partial=True)
    counts = set()
    for caption in corpus:
        parsed = grammar.parse_caption(caption)
        assert parsed and all(obj for obj in parsed), caption
        counts.update(len(obj) for obj in parsed)
    assert counts == {1, 2, 3, 4}
    named = {
        (o["colour"], o["shape"])
        for c in corpus
        for o in grammar.parse_caption(c)
        if {"colour", "shape"} <= set(o)
    }
    assert set(grammar.HELD_OUT_PAIRS) <= named  # the text-only pairs are still in the corpus


@pytest.mark.parametrize("seed", range(5))
def test_parse_caption_is_exact_on_partial_captions(seed: int) -> None:
    import random

    rng = random.Random(seed)
    pairs = [(c, s) for c in grammar.COLOURS for s in grammar.SHAPES]
    for _ in range(500):
        stated = grammar.partial_objects(grammar.sample_objects(rng, 2, pairs), rng)
        caption = grammar.make_caption(stated, rng)
        parsed = grammar.parse_caption(caption)
        assert len(parsed) == len(stated) and grammar.objects_match(parsed, stated), (stated, caption, parsed)


def test_validate_rejects_a_bad_caption_style_and_count(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--caption-style"):
        partial_config(tmp_path, caption_style="some").validate()
    with pytest.raises(ConfigError, match="--captions-per-image"):
        partial_config(tmp_path, captions_per_image=0).validate()
    with pytest.raises(ConfigError, match="--captions-per-image: the full world has one"):
        partial_config(tmp_path, caption_style="full", captions_per_image=3).validate()


def test_the_full_world_is_the_former_world_byte_for_byte(tmp_path: Path) -> None:
    """`--caption-style full` must keep reproducing older numbers: its captions, labels and corpus hash to
    what the world rendered before the partial world existed (JPEG bytes left out: the encoder's build
    may differ between machines)."""
    import hashlib
    import tarfile

    synth.run_synth(small_config(tmp_path, n_captions=400))
    digest = hashlib.sha256()
    for shard in sorted(tmp_path.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".jpg"):
                    digest.update(member.name.encode())
                    digest.update(tar.extractfile(member).read())
    digest.update((tmp_path / "captions.txt").read_bytes())
    assert digest.hexdigest() == "45cb6cd9ef14254b2d58c418d5703d267d938773eab46ec05b9ceff5d4926b65"
