"""Caches and runs work from any working directory, whatever way a path was spelled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from cli.pipeline import app
from core.clip_models import BUNDLED_CONFIGS
from core.paths import resolve_recorded
from feature_cache.clip_record import embedded_clip
from manifests import read_manifest, write_json_atomic

runner = CliRunner()


def _invoke(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def test_a_clip_file_given_relative_is_recorded_absolute(ran_project, tmp_path, monkeypatch):
    shutil.copy(BUNDLED_CONFIGS / "lafite-tiny.json", ran_project / "clip.json")
    args = ["embed", "world/00000.tar", "--cache", "c2", "--clip-model", "clip.json", "--clip-pretrained", ""]
    _invoke(*args, "--image-size", "32", "--workers", "0")
    monkeypatch.chdir(tmp_path)  # somewhere else entirely
    clip = embedded_clip(ran_project / "c2")
    assert clip.clip_model == str(ran_project / "clip.json")


def test_an_old_cache_with_a_relative_clip_file_still_loads_from_elsewhere(
    ran_project, tmp_path, monkeypatch
):
    """Caches made before recorded the argument as typed, relative to where embed ran."""
    shutil.copy(BUNDLED_CONFIGS / "lafite-tiny.json", ran_project / "clip.json")
    cache = ran_project / "cache"
    for shard in range(3):
        manifest = read_manifest(cache, "embed", shard)
        manifest["unkeyed"]["clip_model_arg"] = "clip.json"
        write_json_atomic(cache / "embed" / "_manifests" / f"{shard:05d}.json", manifest)
    monkeypatch.chdir(tmp_path)
    assert embedded_clip(cache).clip_model == str(ran_project / "clip.json")


def test_resolve_recorded_leaves_tags_and_absolute_paths_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "000-gan").mkdir(parents=True)
    (tmp_path / "demo" / "clip").mkdir(parents=True)
    (tmp_path / "demo" / "clip" / "c.json").write_text("{}")
    checkpoint = tmp_path / "demo" / "runs" / "000-gan" / "0000010.pt"
    elsewhere = tmp_path / "runs" / "000-gan"
    monkeypatch.chdir(elsewhere)
    # recorded relative to tmp_path (where the demo ran), found from the checkpoint's ancestors
    assert resolve_recorded("demo/clip/c.json", checkpoint) == str(tmp_path / "demo" / "clip" / "c.json")
    assert resolve_recorded("openai", checkpoint) == "openai"
    assert resolve_recorded("", checkpoint) == ""
    assert resolve_recorded("/abs/gone.pt", checkpoint) == "/abs/gone.pt"


def _captions_stale(config: str) -> dict:
    Path("pipeline.toml").write_text(config)
    stages = {s["stage"]: s for s in json.loads(_invoke("status", "--json"))}
    return {name: stages[name]["stale"] for name in ("captions", "index", "retrieve", "optimize")}


def test_a_corpus_spelled_absolute_instead_of_relative_is_the_same_corpus(ran_project):
    config = Path("pipeline.toml").read_text()
    assert '"world/captions.parquet"' in config
    fresh = {"captions": {}, "index": {}, "retrieve": {}, "optimize": {}}
    assert _captions_stale(config) == fresh
    spelled = config.replace('"world/captions.parquet"', f'"{ran_project / "world" / "captions.parquet"}"')
    assert _captions_stale(spelled) == fresh
    assert (
        _captions_stale(config.replace('"world/captions.parquet"', '"./world/../world/captions.parquet"'))
        == fresh
    )


def test_an_old_corpus_record_with_relative_names_is_still_up_to_date(ran_project):
    from manifests import digest_input_file

    corpus_file = ran_project / "cache" / "captions" / "_corpus.json"
    corpus = json.loads(corpus_file.read_text())
    name = "world/captions.parquet"  # as older versions recorded it: spelled as given
    corpus["file_digests"] = {name: digest_input_file(Path(name), name)}
    corpus_file.write_text(json.dumps(corpus))
    assert not {s["stage"]: s for s in json.loads(_invoke("status", "--json"))}["captions"]["stale"]
