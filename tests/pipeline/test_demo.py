"""`pipeline demo`: the whole story end to end (the smoke preset: tiny sizes, a few steps each)."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from pipeline.cli import app


def test_demo_smoke_runs_every_step_and_prints_the_comparison(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--preset", "smoke", "--workers", "0", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    for name in (
        "compare/samples.png",
        "compare/report.md",
        "compare/accuracy_bars.png",
        "clip/clip_eval.json",
    ):
        assert (out / name).is_file(), name
        assert str(out / name) in result.output, name
    assert (out / "clip" / "clip.pt").is_file()
    clip_eval = json.loads((out / "clip" / "clip_eval.json").read_text())
    assert clip_eval["training_data"]["stream"] == "fresh synthetic pairs"  # not the world's own images
    with open(out / "compare" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["condition"] for r in rows) == ["optimize", "perturb"]
    for stage in ("embed", "captions", "index", "retrieve", "optimize"):
        assert list((out / "cache" / stage / "_manifests").glob("*.json")), stage
    assert "perturb" in result.output and "optimize" in result.output and "zero-shot" in result.output


def test_demo_bad_preset_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--preset", "huge"])
    assert result.exit_code == 2 and "--preset" in result.output
