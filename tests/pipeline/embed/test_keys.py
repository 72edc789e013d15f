"""Keys unique across a cache (`--key-prefix`), and dropped inputs named."""

from __future__ import annotations

import json

import pytest
from factories import TINY_CLIP, image_bytes
from typer.testing import CliRunner

from cli.pipeline import app
from world.synth import SynthConfig, run_synth

runner = CliRunner()
EMBED = ["embed", "--clip-model", TINY_CLIP, "--clip-pretrained", "", "--image-size", "32", "--workers", "0"]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """Two worlds whose keys both start at 000000000, as two img2dataset downloads' do."""
    root = tmp_path_factory.mktemp("downloads")
    for name, seed in (("w1", 1), ("w2", 2)):
        run_synth(SynthConfig(out=root / name, n=20, seed=seed, image_size=32, n_captions=40))
    return root


def _embed(*args, code=0):
    result = runner.invoke(app, [*EMBED, *map(str, args)])
    assert result.exit_code == code, result.output
    return result.output


def test_colliding_inputs_are_refused_before_anything_is_written(downloads, tmp_path):
    w1, w2 = downloads / "w1" / "00000.tar", downloads / "w2" / "00000.tar"
    output = _embed(w1, w2, "--cache", tmp_path / "c", code=2)
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    assert f"inputs {w1} and {w2} both hold key '000000000'" in lines[0]
    assert "--key-prefix input" in lines[0]
    assert not (tmp_path / "c" / "embed" / "_manifests").exists()


def test_key_prefix_input_makes_mixed_downloads_one_cache(downloads, tmp_path):
    from feature_cache.embed_rows import read_embed

    cache = tmp_path / "c"
    _embed(
        downloads / "w1" / "00000.tar",
        downloads / "w2" / "00000.tar",
        "--cache",
        cache,
        "--key-prefix",
        "input",
    )
    rows = read_embed(cache)
    assert len(rows.keys) == 40 and len(set(rows.keys)) == 40
    assert {k.split("/")[0] for k in rows.keys} == {"w1", "w2"} and "w1/000000000" in rows.keys


def test_a_later_input_that_collides_with_the_cache_is_refused(downloads, tmp_path):
    cache = tmp_path / "c"
    _embed(downloads / "w1" / "00000.tar", "--cache", cache)
    output = _embed(downloads / "w1" / "00000.tar", downloads / "w2" / "00000.tar", "--cache", cache, code=2)
    assert "both hold key '000000000'" in output and "--key-prefix input" in output


def test_key_prefix_template_and_its_errors(downloads, tmp_path):
    from feature_cache.embed_rows import read_embed

    cache = tmp_path / "c"
    _embed(downloads / "w2" / "00000.tar", "--cache", cache, "--key-prefix", "{parent}-{stem}")
    assert read_embed(cache).keys[0] == "w2-00000/000000000"
    output = _embed(downloads / "w2" / "00000.tar", "--cache", cache, "--key-prefix", "{nope}", code=2)
    assert "--key-prefix {nope}: a TEMPLATE may use only {input}, {parent} and {stem}" in output


def test_dropped_inputs_are_named_in_the_stats_and_at_the_end(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"good{i}.jpg").write_bytes(image_bytes((40 * i, 90, 200)))
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    output = _embed(folder, "--cache", tmp_path / "c")
    assert f"dropped undecodable: {folder / 'broken.jpg'}" in output, output
    stats = json.loads((tmp_path / "c" / "embed" / "_stats" / "00000.json").read_text())
    assert stats["dropped_sources"] == {"undecodable": [str(folder / "broken.jpg")]}
