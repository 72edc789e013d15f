"""pipeline.toml: precedence (defaults < config < flags), `pipeline init`, and one-line errors."""

from __future__ import annotations

import json

import pytest
from factories import TINY_CLIP, image_bytes
from typer.testing import CliRunner

from cli.pipeline import app

runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(image_bytes((60 * i, 10, 10)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(path, text):
    path.write_text(text)
    return path


def _dry_run(*args):
    result = runner.invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


CONFIG = f"""
cache = "from-config"
[embed]
inputs = ["imgs"]
clip_model = "{TINY_CLIP}"
clip_pretrained = ""
image-size = 48
workers = 0
"""


def test_defaults_then_config_then_flags(project):
    default = _dry_run("embed", "imgs", "--clip-model", TINY_CLIP, "--clip-pretrained", "")
    assert default["config"]["image_size"] == 256 and default["config"]["cache"] == "cache"
    _write(project / "pipeline.toml", CONFIG)
    from_config = _dry_run("embed")  # ./pipeline.toml is read by default; inputs come from it too
    assert from_config["config"]["image_size"] == 48
    assert from_config["config"]["cache"] == "from-config"
    assert from_config["config"]["inputs"] == ["imgs"]
    flagged = _dry_run("embed", "--image-size", "32", "--cache", "elsewhere")
    assert flagged["config"]["image_size"] == 32 and flagged["config"]["cache"] == "elsewhere"


def test_explicit_config_path(project):
    _write(project / "other.toml", CONFIG.replace("48", "40"))
    assert _dry_run("--config", "other.toml", "embed")["config"]["image_size"] == 40


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[embed]\nimagesize = 3\n", "[embed] unknown key 'imagesize'"),
        ("[embed]\nimage_size = 'big'\n", "[embed] image_size: expected an integer, got 'big'"),
        ("[embed]\nverify = 1\n", "[embed] verify: expected true or false"),
        ("[embed]\ninputs = 'imgs'\n", "[embed] inputs: expected a list"),
        ("[embedd]\n", "unknown section [embedd]"),
        ("image_size = 3\n", "unknown top-level key 'image_size'"),
        ("[embed\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(project, text, message):
    _write(project / "pipeline.toml", text)
    result = runner.invoke(app, ["embed", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output


def test_missing_explicit_config(project):
    result = runner.invoke(app, ["--config", "nope.toml", "embed"])
    assert result.exit_code == 2 and "nope.toml: file not found" in result.output


def test_init_writes_a_config_that_loads_back(project):
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    text = (project / "pipeline.toml").read_text()
    assert "[embed]" in text and 'clip_model = "ViT-B-32"' in text and "# Images per CLIP" in text
    again = runner.invoke(app, ["init"])
    assert again.exit_code == 2 and "exists" in again.output
    # every written key is accepted by the checker, and the defaults come back unchanged
    text = text.replace("inputs = []", 'inputs = ["imgs"]').replace('"ViT-B-32"', f'"{TINY_CLIP}"')
    _write(project / "pipeline.toml", text.replace('clip_pretrained = "auto"', 'clip_pretrained = ""'))
    assert _dry_run("embed")["config"]["image_size"] == 256
