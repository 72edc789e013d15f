"""The `pipeline` CLI: every command's success path and its error paths (exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from factories import TINY_CLIP
from typer.testing import CliRunner

from cli.pipeline import app

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _user_error(args, message):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0], result.output
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    _ok(["synth", "--out", out, "--n", 12, "--shard-size", 6, "--n-captions", 40, "--image-size", 32])
    return out


def test_synth_writes_shards_and_corpus(world):
    assert sorted(p.name for p in world.iterdir()) == [
        "00000.tar",
        "00001.tar",
        "captions.parquet",
        "captions.txt",
    ]
    assert len((world / "captions.txt").read_text().splitlines()) == 40


def test_synth_bad_option(tmp_path):
    _user_error(["synth", "--out", tmp_path, "--max-objects", 3], "--max-objects")


def test_embed_then_noop_rerun_then_dry_run(world, tmp_path):
    cache = tmp_path / "cache"
    args = [
        "embed",
        f"{world}/*.tar",
        "--cache",
        cache,
        "--clip-model",
        TINY_CLIP,
        "--clip-pretrained",
        "",
        "--image-size",
        32,
        "--workers",
        0,
    ]
    first = _ok(args)
    assert "2 shard(s) made, 0 up to date; 12 images written" in first.output
    second = _ok(args)
    assert "0 shard(s) made, 2 up to date" in second.output
    plan = json.loads(_ok([*args[:-2], "--image-size", 16, "--dry-run"]).stdout)
    assert plan["shards_to_run"] == {"0": "params changed: image_size", "1": "params changed: image_size"}
    assert plan["config"]["image_size"] == 16


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["/definitely/not/here"], "no such file or folder"),
        (["--image-size", "-3"], "--image-size"),
        (["--image-format", "gif"], "--image-format"),
        (["--max-aspect", "0.5"], "--max-aspect must be a finite number of at least 1"),
        (["--clip-model", "no-such-arch"], "--clip-model"),
        (["--clip-pretrained", "/missing/ckpt.pt"], "checkpoint file not found"),
    ],
)
def test_embed_errors_are_one_line(world, tmp_path, extra, message):
    inputs = [] if extra[0].startswith("/definitely") else [f"{world}/00000.tar"]
    base = ["--cache", tmp_path / "c", "--clip-model", TINY_CLIP, "--clip-pretrained", "", "--workers", 0]
    _user_error(["embed", *inputs, *base, *extra], message)


def test_embed_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    args = ["embed", tmp_path / "empty", "--cache", tmp_path / "c", "--clip-model", TINY_CLIP]
    _user_error(args, "no images")


def test_help_is_instant_because_heavy_modules_are_not_imported():
    """Nor numpy: it sizes its thread pools when imported, which must come after the root callback sets
    the thread count (core.processes.start_threads). The stage configs the options read their
    defaults from are light modules for this (pipeline/*_config.py)."""
    heavy = "('torch', 'open_clip', 'faiss', 'pyarrow', 'numpy', 'PIL')"
    code = f"import sys, cli.pipeline; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_has_help():
    for command in ("synth", "embed"):
        assert "Usage" in _ok([command, "--help"]).output
