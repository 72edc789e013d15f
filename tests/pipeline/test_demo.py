"""`pipeline demo`: the whole story end to end (the smoke preset: tiny sizes, a few steps each)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pipeline.cli import app


def test_demo_smoke_runs_every_step_and_prints_where_the_outputs_are(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--preset", "smoke", "--workers", "0", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    for name in ("samples.png", "eval/eval.json", "clip/clip_eval.json", "clip/clip.pt"):
        assert (out / name).is_file(), name
        assert str(out / name) in result.output or name.startswith("clip/clip.pt")
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert {"fid", "fid_features", "clip_score", "attribute_accuracy"} <= set(evaluation)
    for stage in ("embed", "captions", "index", "retrieve", "optimize"):
        assert list((out / "cache" / stage / "_manifests").glob("*.json")), stage
    assert "CLIP score" in result.output


def test_demo_bad_preset_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--preset", "huge"])
    assert result.exit_code == 2 and "--preset" in result.output
