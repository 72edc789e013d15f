"""`pipeline demo`: the whole story end to end (the smoke preset: tiny sizes, a few steps each), and a
rerun into the same folder."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import demo as demo_module
from cli.pipeline import app
from core import clip as clip_module


def run_demo(out: Path, *more: str):
    return CliRunner().invoke(
        app, ["demo", "--out", str(out), "--preset", "smoke", "--workers", "0", "--device", "cpu", *more]
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = run_demo(out)
    assert result.exit_code == 0, result.output
    return out, result


def test_demo_smoke_runs_every_step_and_prints_the_comparison(demo):
    out, result = demo
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
    # the partial world by default, and the CLIP's gap printed beside its zero-shot accuracy
    world = json.loads((out / "world" / "demo_world.json").read_text())["config"]
    assert world["caption_style"] == "partial" and clip_eval["training_data"]["caption_style"] == "partial"
    gap = clip_eval["modality_gap"]
    assert f"cos(image, own caption) {gap['cos_image_own_caption']:.2f}" in result.output
    assert re.search(r"^demo 2/4 clip: .*zero-shot .*modality gap: .*gap vector", result.output, re.M)
    # one plain line per step, with its time (the output is no terminal here)
    for i, step in enumerate(("synth", "clip", "pipeline", "compare"), 1):
        assert re.search(rf"^demo {i}/4 {step}: .*\bin \d+:\d\d:\d\d\b", result.output, re.M), result.output


@pytest.mark.parametrize("generator", ["ldm", "dalle"])
def test_demo_runs_each_family_on_the_same_cache(demo, generator):
    """`--generator` compares another family in its own folder, reusing the world, the CLIP and the cache."""
    out, _ = demo
    result = run_demo(out, "--generator", generator)
    assert result.exit_code == 0, result.output
    assert "demo 1/4 synth: kept" in result.output and "demo 2/4 clip: reused" in result.output, result.output
    assert "demo 3/4 pipeline: 0 images embedded" in result.output, result.output
    report = out / f"compare-{generator}" / "report.md"
    assert str(report) in result.output and f"One `{generator}`" in report.read_text()
    with open(out / f"compare-{generator}" / "results.csv", newline="") as f:
        assert sorted(r["condition"] for r in csv.DictReader(f)) == ["optimize", "perturb"]
    assert (out / "compare" / "report.md").is_file()  # the GAN's comparison is left as it was


def test_demo_names_every_generator_family():
    from trainers.families.registry import FAMILIES

    assert demo_module.GENERATORS == tuple(FAMILIES)


def folders(root: Path) -> list[str]:
    """Every folder under root; a stored sample set (named by the data it holds) counts by its kind."""
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()]
    return sorted(re.sub(r"/samples-[0-9a-f]+", "/samples-KEY", n) for n in names)


def assert_up_to_date(out: Path, monkeypatch) -> None:
    """`pipeline status` in the demo's folder (its pipeline.toml) sees every stage configured and fresh,
    and `pipeline run --config` from elsewhere has nothing to do."""
    runner = CliRunner()
    monkeypatch.chdir(out)
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    for stage in json.loads(result.stdout):
        assert stage["up_to_date"] > 0 and not stage["stale"], stage
        assert "not configured" not in stage["note"], stage
    monkeypatch.chdir(out.parent)
    result = runner.invoke(app, ["--config", str(out / "pipeline.toml"), "run"])
    assert result.exit_code == 0, result.output
    assert "embed: 0 shard(s) made" in result.output and "optimize: 0 shard(s) made" in result.output


def test_demo_reruns_in_its_folder(demo, monkeypatch):
    out, _ = demo
    before = folders(out)
    result = run_demo(out)  # same presets: the trained CLIP is reused, nothing is restaged
    assert result.exit_code == 0, result.output
    assert "demo 1/4 synth: kept" in result.output and "demo 2/4 clip: reused" in result.output, result.output
    assert "demo 3/4 pipeline: 0 images embedded" in result.output, result.output
    assert "compare: 0 run(s) made, 2 up to date" in result.output, result.output
    assert folders(out) == before
    assert (out / "pipeline.toml").is_file()
    assert_up_to_date(out, monkeypatch)

    # a CLIP trained anew (other bytes) stales the captions encoded by the old one: the demo restages them
    smoke = demo_module.PRESETS["smoke"]
    monkeypatch.setitem(demo_module.PRESETS, "smoke", {**smoke, "clip": {**smoke["clip"], "seed": 1}})
    # a fresh process, as each `pipeline demo` is: `cached_clip` keys on the checkpoint's path, so in this
    # process it would serve the CLIP of the runs above from the rewritten file
    monkeypatch.setattr(clip_module, "_LOADED", {})
    monkeypatch.chdir(out.parent)
    result = run_demo(out)
    assert result.exit_code == 0, result.output
    assert "compare: 2 run(s) made" in result.output, result.output
    assert folders(out) == before
    assert_up_to_date(out, monkeypatch)


def test_an_interrupted_demo_resumes_its_clip(tmp_path, monkeypatch):
    """Ctrl-C in the CLIP's training, after a checkpoint: the rerun continues from it, not from step 0."""
    import trainers.clip.train as clip_train

    smoke = demo_module.PRESETS["smoke"]
    monkeypatch.setitem(
        demo_module.PRESETS, "smoke", {**smoke, "clip": {**smoke["clip"], "checkpoint_every": 4}}
    )
    save = clip_train.save_train_state

    def save_then_stop(config, step, *args):
        save(config, step, *args)
        if step == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(clip_train, "save_train_state", save_then_stop)
    stopped = run_demo(tmp_path / "demo")
    assert stopped.exit_code == 130, stopped.output  # as Ctrl-C
    monkeypatch.setattr(clip_train, "save_train_state", save)
    result = run_demo(tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert re.search(r"^demo 2/4 clip: 10 steps \(resumed at step 8\) -> ", result.output, re.M), (
        result.output
    )
    assert not (tmp_path / "demo" / "clip" / "train_state.pt").exists()


def test_demo_bad_preset_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--preset", "huge"])
    assert result.exit_code == 2 and "--preset" in result.output
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--generator", "vae"])
    assert result.exit_code == 2 and "--generator vae: choose one of gan, ldm, dalle" in result.output
    assert not any(tmp_path.iterdir())


def test_demo_full_world_option_is_refused_when_unknown(tmp_path):
    result = run_demo(tmp_path / "demo", "--world", "some")
    assert result.exit_code == 2 and "--world some: choose one of partial, full" in result.output
