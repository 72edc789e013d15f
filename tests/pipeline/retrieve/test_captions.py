"""Retrieve step 1 (pipeline/retrieve/captions.py): corpus formats, drops, sharding, incremental runs, CLIP
checks."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import TINY_CLIP

from core.errors import ConfigError
from feature_cache.clip_record import embedded_clip
from feature_cache.layout import captions_schema
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import run_embed
from pipeline.retrieve import captions as cap
from pipeline.retrieve.config import CaptionsConfig
from world.synth import SynthConfig, run_synth

# What every format below holds: padded whitespace, an exact duplicate (after normalising), an empty record.
RAW = ["a red circle", "  a   blue\tsquare ", "a red circle", "", "a green\u00a0star on the left"]
KEPT = ["a red circle", "a blue square", "a green star on the left"]


def _write(path, fmt: str, values: list[str], column: str = "caption", gz: bool = False):
    if fmt == "txt":
        data = "".join(v.replace("\n", " ") + "\n" for v in values).encode()
    elif fmt == "jsonl":
        data = "".join(json.dumps({column: v, "other": 1}) + "\n" for v in values).encode()
    elif fmt in ("csv", "tsv"):
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",")
        writer.writerow(["id", column])
        writer.writerows([i, v] for i, v in enumerate(values))
        data = buf.getvalue().encode()
    else:
        table = pa.table({"id": pa.array(range(len(values))), column: pa.array(values, pa.string())})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _read(paths, column="caption"):
    kept, drops = [], {}
    for text, reason in cap.read_corpus([*paths], column):
        if reason:
            drops[reason] = drops.get(reason, 0) + 1
        else:
            kept.append(text)
    return kept, drops


@pytest.mark.parametrize(
    "name,fmt,gz",
    [
        ("c.txt", "txt", False),
        ("c.txt.gz", "txt", True),
        ("c.jsonl", "jsonl", False),
        ("c.jsonl.gz", "jsonl", True),
        ("c.csv", "csv", False),
        ("c.csv.gz", "csv", True),
        ("c.tsv", "tsv", False),
        ("c.parquet", "parquet", False),
    ],
)
def test_every_format_normalises_and_counts_empty(tmp_path, name, fmt, gz):
    path = _write(tmp_path / name, fmt, RAW, gz=gz)
    kept, drops = _read(cap.corpus_files([str(path)]))
    assert kept == ["a red circle", "a blue square", "a red circle", "a green star on the left"]
    assert drops == {"empty": 1}


def test_custom_caption_column(tmp_path):
    for fmt in ("jsonl", "csv", "parquet"):
        path = _write(tmp_path / f"c.{fmt}", fmt, ["x y", "z"], column="text")
        assert _read([path], "text") == (["x y", "z"], {})
        with pytest.raises(ConfigError, match="--caption-column caption"):
            _read([path], "caption")


def test_bad_lines_are_counted_by_reason(tmp_path):
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"good one\n\xff\xfe broken\n   \n\n\xef\xbb\xbfwith bom\r\n")
    assert _read([txt]) == (["good one", "with bom"], {"non_utf8": 1, "empty": 2})

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(
        b'{"caption": "ok"}\n{not json\n[1, 2]\n{"caption": 5}\n{"caption": null}\n\n'
        b'{"caption": "caf\xc3\xa9"}\n\xff{"caption": "x"}\n'
    )
    assert _read([jsonl]) == (
        ["ok", "café"],
        {"bad_json": 1, "bad_record": 2, "empty": 2, "non_utf8": 1},
    )

    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(b'id,caption\n1,fine\n2\n3,\xff\xfebad\n4,"multi\nline"\n')
    assert _read([csv_path]) == (["fine", "multi line"], {"bad_record": 1, "non_utf8": 1})

    parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": pa.array([b"ok", b"\xff\xfe", None], pa.binary())}), parquet)
    assert _read([parquet]) == (["ok"], {"non_utf8": 1, "empty": 1})


def test_gzip_is_sniffed_not_trusted_from_the_name(tmp_path):
    path = tmp_path / "really_gzipped.txt"
    path.write_bytes(gzip.compress(b"one\ntwo\n"))
    assert _read([path]) == (["one", "two"], {})


def test_globs_and_folders_read_files_in_name_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("b1\nb2\n")
    (folder / "a.txt").write_text("a1\n")
    _write(folder / "c.jsonl.gz", "jsonl", ["c1"], gz=True)
    (folder / "notes.md").write_text("not a corpus")
    expected = ["a1", "b1", "b2", "c1"]
    assert _read(cap.corpus_files([str(folder)]))[0] == expected
    assert _read(cap.corpus_files([f"{folder}/*.txt", f"{folder}/*.gz"]))[0] == expected
    # The same file named twice is read once.
    assert _read(cap.corpus_files([f"{folder}/a.txt", f"{folder}/a.txt"]))[0] == ["a1"]


def test_missing_unknown_and_malformed_corpora_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        cap.corpus_files([str(tmp_path / "nope.txt")])
    with pytest.raises(ConfigError, match="matches no caption file"):
        cap.corpus_files([str(tmp_path / "*.txt")])
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(ConfigError, match="unknown caption file format"):
        cap.corpus_files([str(tmp_path / "x.md")])
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match="not a readable Parquet"):
        _read([tmp_path / "broken.parquet"])
    (tmp_path / "broken.txt.gz").write_bytes(gzip.compress(b"abc\n")[:-6])
    with pytest.raises(ConfigError, match="cannot read"):
        _read([tmp_path / "broken.txt.gz"])


# ---------------------------------------------------------------------------------------------------------
# With a cache: planning, encoding, incremental reruns, CLIP checks
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """An embed stage (8 tiny images, lafite-tiny) to copy into each test's own cache."""
    root = tmp_path_factory.mktemp("captions")
    world = run_synth(SynthConfig(out=root / "world", n=8, shard_size=8, n_captions=40, image_size=32))
    cache = root / "cache"
    run_embed(
        EmbedConfig(
            inputs=tuple(str(s) for s in world.shards),
            cache=cache,
            clip_model=TINY_CLIP,
            clip_pretrained="",
            image_size=32,
            workers=0,
        )
    )
    return root


@pytest.fixture
def cache(embedded, tmp_path):
    shutil.copytree(embedded / "cache", tmp_path / "cache")
    return tmp_path / "cache"


def _corpus(path, texts):
    path.write_text("".join(t + "\n" for t in texts))
    return path


def _config(cache, corpus, **kw):
    kw.setdefault("shard_size", 20)
    kw.setdefault("batch_size", 16)
    return CaptionsConfig(corpus=(str(corpus),), cache=cache, device="cpu", **kw)


def _texts(n, start=0):
    return [f"caption number {i} of a small red circle" for i in range(start, start + n)]


@pytest.fixture
def count_encoded(monkeypatch):
    """Every text passed to CLIP, in order."""
    import core.clip

    seen: list[str] = []
    real = core.clip.encode_texts

    def spy(bundle, texts):
        seen.extend(texts)
        return real(bundle, texts)

    monkeypatch.setattr(core.clip, "encode_texts", spy)
    return seen


def _shard(cache, j):
    return cap.read_caption_shard(cache / "captions" / f"{j:05d}.parquet")


def test_shards_hold_contiguous_ids_and_clip_features(cache, tmp_path):
    from core.clip import cached_clip, encode_texts

    corpus = _corpus(tmp_path / "c.txt", _texts(30) + ["caption number 3 of a small red circle", ""])
    clip = embedded_clip(cache)
    result = cap.run_captions(_config(cache, corpus), clip)
    assert result.shards_run == [0, 1] and result.summary["n_captions"] == 30
    assert result.summary["corpus"]["dropped"] == {"duplicate": 1, "empty": 1}
    assert pq.read_schema(cache / "captions" / "00000.parquet") == captions_schema(64)
    first, second = _shard(cache, 0), _shard(cache, 1)
    assert first["caption_id"].tolist() == list(range(20))
    assert second["caption_id"].tolist() == list(range(20, 30))
    assert first["text"] + second["text"] == _texts(30)
    bundle = cached_clip(TINY_CLIP, "", "cpu")
    expected = encode_texts(bundle, second["text"]).numpy().astype(np.float16)
    np.testing.assert_allclose(second["txt_emb"].astype(np.float32), expected, atol=2e-3)
    norms = np.linalg.norm(first["txt_emb"].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    stats = json.loads((cache / "captions" / "_stats" / "00001.json").read_text())
    assert stats["rows"] == 10 and stats["encoded"] == 10 and stats["first_caption_id"] == 20
    assert stats["dropped_while_reading"] == {"duplicate": 1, "empty": 1}


def test_rerun_is_a_noop_and_append_encodes_only_new_captions(cache, tmp_path, count_encoded):
    clip = embedded_clip(cache)
    corpus = _corpus(tmp_path / "c.txt", _texts(50))
    cap.run_captions(_config(cache, corpus), clip)
    assert len(count_encoded) == 50
    before = {j: _shard(cache, j) for j in range(3)}

    count_encoded.clear()
    again = cap.run_captions(_config(cache, corpus), clip)
    assert again.shards_run == [] and again.shards_up_to_date == [0, 1, 2] and count_encoded == []

    _corpus(corpus, _texts(50) + _texts(15, start=50))
    grown = cap.run_captions(_config(cache, corpus), clip)
    assert grown.shards_run == [2, 3] and grown.shards_up_to_date == [0, 1]
    assert count_encoded == _texts(15, start=50)  # only the appended captions went through CLIP
    after = _shard(cache, 2)
    np.testing.assert_array_equal(after["txt_emb"][:10], before[2]["txt_emb"])  # reused, bit for bit
    assert after["caption_id"].tolist() == list(range(40, 60))
    assert _shard(cache, 3)["caption_id"].tolist() == list(range(60, 65))

    count_encoded.clear()
    forced = cap.run_captions(_config(cache, corpus, force=True), clip)
    assert forced.shards_run == [0, 1, 2, 3] and len(count_encoded) == 65  # --force re-encodes, no reuse


def test_insert_in_the_middle_encodes_about_one_caption_per_shifted_shard(cache, tmp_path, count_encoded):
    clip = embedded_clip(cache)
    corpus = _corpus(tmp_path / "c.txt", _texts(60))
    cap.run_captions(_config(cache, corpus), clip)
    count_encoded.clear()
    _corpus(corpus, ["a brand new caption up front"] + _texts(60))
    result = cap.run_captions(_config(cache, corpus), clip)
    assert result.shards_run == [0, 1, 2, 3]
    # Shard j now holds old shard j minus its last caption plus old shard j-1's last: one new vector each.
    old = _texts(60)
    assert count_encoded == ["a brand new caption up front", old[19], old[39], old[59]]


def test_shrunk_corpus_removes_surplus_shards(cache, tmp_path):
    clip = embedded_clip(cache)
    corpus = _corpus(tmp_path / "c.txt", _texts(50))
    cap.run_captions(_config(cache, corpus), clip)
    _corpus(corpus, _texts(25))
    result = cap.run_captions(_config(cache, corpus), clip)
    assert result.shards_run == [1] and result.shards_total == 2
    assert sorted(p.name for p in (cache / "captions").glob("0*")) == ["00000.parquet", "00001.parquet"]
    assert sorted(p.name for p in (cache / "captions" / "_stats").iterdir()) == ["00000.json", "00001.json"]
    assert sorted(p.name for p in (cache / "captions" / "_manifests").iterdir()) == [
        "00000.json",
        "00001.json",
    ]


def test_long_captions_are_counted_as_truncated(cache, tmp_path):
    long = "a very long caption " + " ".join(f"word{i}" for i in range(40))  # > 32 tokens (lafite-tiny)
    corpus = _corpus(tmp_path / "c.txt", ["short one", long])
    result = cap.run_captions(_config(cache, corpus), embedded_clip(cache))
    assert result.summary["truncated"] == 1
    assert json.loads((cache / "captions" / "_stats" / "00000.json").read_text())["truncated"] == 1


def test_truncated_counts_only_this_runs_encoded_captions(cache, tmp_path):
    """Appending 2 short captions to a corpus holding a long one: the run encoded 2, truncated none."""
    long = "a very long caption " + " ".join(f"word{i}" for i in range(40))  # > 32 tokens (lafite-tiny)
    corpus = _corpus(tmp_path / "c.txt", ["short one", long])
    cap.run_captions(_config(cache, corpus), embedded_clip(cache))
    _corpus(corpus, ["short one", long, "short two", "short three"])
    result = cap.run_captions(_config(cache, corpus), embedded_clip(cache))
    assert result.shards_run == [0]
    assert (result.summary["encoded"], result.summary["truncated"]) == (2, 0)
    stats = json.loads((cache / "captions" / "_stats" / "00000.json").read_text())
    assert (stats["truncated"], stats["encoded_truncated"]) == (1, 0)  # the shard holds one; none new


def test_empty_corpus_is_a_config_error(cache, tmp_path):
    corpus = tmp_path / "blank.txt"
    corpus.write_text("\n   \n\t\n")
    with pytest.raises(ConfigError, match="no usable captions .*3 empty"):
        cap.plan_captions(_config(cache, corpus), embedded_clip(cache))


def test_captions_from_another_clip_are_refused_unless_forced(cache, tmp_path):
    corpus = _corpus(tmp_path / "c.txt", _texts(5))
    clip = embedded_clip(cache)
    cap.run_captions(_config(cache, corpus), clip)
    manifest_path = cache / "captions" / "_manifests" / "00000.json"
    manifest = json.loads(manifest_path.read_text())

    other = dict(manifest, params={**manifest["params"], "clip_weights": "tag:openai"})
    manifest_path.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="tag:openai.*must share one CLIP.*--force"):
        cap.plan_captions(_config(cache, corpus), clip)

    manifest_path.write_text(json.dumps(dict(manifest, dim=32)))
    with pytest.raises(ConfigError, match="dim 32.*dim 64"):
        cap.plan_captions(_config(cache, corpus), clip)

    forced = cap.run_captions(_config(cache, corpus, force=True), clip)
    assert forced.shards_run == [0] and forced.summary["encoded"] == 5
    assert json.loads(manifest_path.read_text())["dim"] == 64


def test_a_cache_embedded_by_another_clip_refuses_its_captions(cache, embedded, tmp_path):
    """Real mismatch: images re-embedded with a 32-d CLIP; the 64-d caption shards must not be used."""
    corpus = _corpus(tmp_path / "c.txt", _texts(5))
    cap.run_captions(_config(cache, corpus), embedded_clip(cache))
    config_json = tmp_path / "clip32.json"
    config_json.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    shards = tuple(str(p) for p in sorted((embedded / "world").glob("*.tar")))
    run_embed(
        EmbedConfig(
            inputs=shards,
            cache=cache,
            clip_model=str(config_json),
            clip_pretrained="",
            image_size=32,
            workers=0,
        )
    )
    clip = embedded_clip(cache)
    assert clip.dim == 32
    with pytest.raises(ConfigError, match="dim 64.*dim 32"):
        cap.plan_captions(_config(cache, corpus), clip)
