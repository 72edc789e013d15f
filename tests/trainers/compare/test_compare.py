"""`trainers compare`: runs at one budget, results/report/figures, keyed reruns, SIGKILL safety, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from factories import tiny_cache
from PIL import Image
from typer.testing import CliRunner

from cli.trainers import app
from trainers.compare.config import CompareConfig
from trainers.compare.report import chance_levels, stats
from trainers.compare.run import describe, run_compare
from trainers.compare.tables import cell

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

runner = CliRunner()
CLI = [sys.executable, "-c", "from cli.trainers import main; main()"]
SMOKE = ["--preset", "smoke", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("compare-cache"))


def smoke(cache, out, **given) -> CompareConfig:
    values = dict(cache=cache, out=out, conditions=("perturb", "caption"), seeds=(0,), device="cpu")
    return CompareConfig.from_preset("smoke", **{**values, **given})


def manifests(out) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted((out / "_manifests").glob("*.json"))}


def run_dirs(out) -> dict[str, list[str]]:
    """Each unit's run folders: exactly ["000-gan"] when it was made once (a second try would add 001)."""
    return {
        unit.name: sorted(p.name for p in unit.iterdir() if p.name.endswith("-gan"))
        for unit in sorted((out / "runs").iterdir())
    }


@pytest.fixture(scope="module")
def compared(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("compared")
    config = smoke(cache, out, seeds=(0, 1))
    return config, run_compare(config)


def test_compare_writes_results_report_and_figures(compared):
    config, result = compared
    out = config.out
    assert result.ran == ["perturb-s0", "perturb-s1", "caption-s0", "caption-s1"] and not result.up_to_date
    assert run_dirs(out) == {name: ["000-gan"] for name in result.ran}
    assert set(manifests(out)) == set(result.ran)

    rows = json.loads((out / "results.json").read_text())["rows"]
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["condition"], int(r["seed"])) for r in table] == [
        ("perturb", 0),
        ("perturb", 1),
        ("caption", 0),
        ("caption", 1),
    ]
    assert len(rows) == 4
    for row in table:
        assert row["generator"] == "gan" and int(row["steps"]) == config.steps == 2
        assert int(row["batch_size"]) == config.batch_size
        for column in ("fid", "clip_score", "acc_shape", "acc_seen_colour", "acc_held_out_position"):
            assert 0 <= float(row[column]) < 1000, column
    assert table[0]["key"] != table[1]["key"]  # the seed is keyed

    report = (out / "report.md").read_text()
    lines = report.splitlines()
    for label in ("perturb", "caption", "chance", "real images"):
        assert any(line.startswith(f"| {label} |") for line in lines), label
    assert " ± " in report and "(" in report  # mean ± std (min-max) over the two seeds
    assert "trainers compare --cache" in report and "accuracy_bars.png" in report
    assert "features.md" in report and (out / "features.md").is_file()

    for name, min_size in (("accuracy_bars.png", (300, 200)), ("samples.png", (150, 300))):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.size >= min_size, name
    text = describe(result)
    assert "| perturb | 2 |" in text and "4 run(s) made" in text


def test_rerun_does_nothing(compared):
    config, _ = compared
    before = manifests(config.out)
    checkpoint = config.out / "runs/perturb-s0/000-gan/0000002.pt"
    mtime = checkpoint.stat().st_mtime_ns
    again = run_compare(config)
    assert again.ran == [] and len(again.up_to_date) == 4 and not again.reasons
    assert manifests(config.out) == before and checkpoint.stat().st_mtime_ns == mtime
    assert len(again.rows) == 4


def test_only_new_or_changed_runs_are_made(cache, tmp_path):
    out = tmp_path / "cmp"
    assert run_compare(smoke(cache, out, conditions=("perturb",))).ran == ["perturb-s0"]
    first = manifests(out)["perturb-s0"]

    added = run_compare(smoke(cache, out))  # a condition added: only it runs
    assert added.ran == ["caption-s0"] and added.up_to_date == ["perturb-s0"]
    assert added.reasons == {"caption-s0": "new run"}
    assert manifests(out)["perturb-s0"] == first and len(added.rows) == 2

    # A run folder without its manifest (a crash) is removed and redone; the other run stays.
    (out / "_manifests/caption-s0.json").unlink()
    (out / "runs/caption-s0/stray.txt").write_text("left by a killed run")
    redone = run_compare(smoke(cache, out))
    assert redone.ran == ["caption-s0"] and redone.reasons["caption-s0"].startswith("unfinished")
    assert not (out / "runs/caption-s0/stray.txt").exists()
    assert run_dirs(out) == {"caption-s0": ["000-gan"], "perturb-s0": ["000-gan"]}

    changed = run_compare(smoke(cache, out, steps=3))  # the budget: every run again
    assert changed.ran == ["perturb-s0", "caption-s0"]
    assert changed.reasons["perturb-s0"] == "params changed: train.steps"
    assert {r["steps"] for r in changed.rows} == {3}
    assert run_dirs(out) == {"caption-s0": ["000-gan"], "perturb-s0": ["000-gan"]}


def _compare(cache, out, crash_at: str):
    env = {**os.environ, "PIPELINE_CRASH_AT": crash_at, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["compare", "--cache", str(cache), "--out", str(out), "--conditions", "perturb,caption", "--seeds"]
    return subprocess.run([*CLI, *args, "0", *SMOKE], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    "point, committed",
    [
        ("compare:caption-s0:before_manifest", ["perturb-s0"]),  # trained, evaluated, not committed
        ("write:0000002.pt:before_replace", []),  # mid-run: the first run's checkpoint not yet in place
    ],
)
def test_sigkill_then_rerun_commits_every_run_once(cache, tmp_path, point, committed):
    out = tmp_path / "cmp"
    killed = _compare(cache, out, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(manifests(out)) == committed
    kept = manifests(out)

    rerun = run_compare(smoke(cache, out))
    assert rerun.up_to_date == committed
    assert sorted(rerun.ran) == sorted({"perturb-s0", "caption-s0"} - set(committed))
    assert {k: v for k, v in manifests(out).items() if k in committed} == kept  # not redone
    assert run_dirs(out) == {"caption-s0": ["000-gan"], "perturb-s0": ["000-gan"]}
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert len(rerun.rows) == 2 and (out / "report.md").is_file()


def test_a_damaged_eval_json_is_one_line_and_a_damaged_manifest_redoes_its_run(cache, tmp_path):
    out = tmp_path / "cmp"
    config = smoke(cache, out, conditions=("perturb",))
    assert run_compare(config).ran == ["perturb-s0"]
    evaluation, manifest = out / "runs/perturb-s0/eval/eval.json", out / "_manifests/perturb-s0.json"
    for path in (evaluation, manifest):  # bit rot: one byte, size and mtime unchanged
        st = path.stat()
        path.write_bytes(b"\xff" + path.read_bytes()[1:])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        if path == evaluation:
            args = ["compare", "--cache", str(cache), "--out", str(out), "--conditions", "perturb"]
            result = runner.invoke(app, [*args, "--seeds", "0", *SMOKE])
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            lines = [x for x in result.output.splitlines() if x.strip() and not x.startswith("warning")]
            assert len(lines) == 1 and str(evaluation) in lines[0] and str(manifest) in lines[0], lines
    with pytest.warns(UserWarning, match="perturb-s0.json: not valid JSON .*the run is redone"):
        again = run_compare(config)
    assert again.ran == ["perturb-s0"] and json.loads(manifest.read_text())["unit"] == "perturb-s0"
    assert json.loads(evaluation.read_text())["n"] == config.eval_n  # remade with the run


@pytest.mark.parametrize(
    "generator, autoencoder, encoded", [("ldm", "vae", "latents"), ("dalle", "dvae", "tokens")]
)
def test_an_autoencoder_family_trains_one_shared_autoencoder(
    cache, tmp_path, generator, autoencoder, encoded
):
    out = tmp_path / "cmp"
    given = dict(generator=generator, conditions=("perturb",), seeds=(0, 1))
    result = run_compare(smoke(cache, out, features=False, **given))
    assert result.ran == [autoencoder, "perturb-s0", "perturb-s1"]
    assert [p.name for p in (out / autoencoder).iterdir()] == [f"000-{autoencoder}"]
    deps = [json.loads((out / f"_manifests/perturb-s{s}.json").read_text())["deps"] for s in (0, 1)]
    digests = [next(d["digest"] for d in dep if d["name"] == autoencoder) for dep in deps]
    assert digests[0] == digests[1] != "not trained yet"
    checkpoint = json.loads((out / f"_manifests/{autoencoder}.json").read_text())["checkpoint"]
    assert (out / checkpoint).parent.name == f"000-{autoencoder}"
    assert list((cache / encoded).glob("*/_manifests/*.json")), "the runs read the encoded cache"
    assert {r["generator"] for r in result.rows} == {generator}
    assert run_compare(smoke(cache, out, **given)).ran == []


def test_a_new_model_version_redoes_the_committed_runs(cache, tmp_path, monkeypatch):
    """Runs made before a change of the family's maths (its `version`) are not reported as current."""
    from dataclasses import replace

    from trainers.families import registry as generators

    out = tmp_path / "cmp"
    config = smoke(cache, out, conditions=("perturb",), features=False)
    assert run_compare(config).ran == ["perturb-s0"] and run_compare(config).ran == []
    gan = generators.FAMILIES["gan"]
    monkeypatch.setitem(generators.FAMILIES, "gan", replace(gan, version=str(int(gan.version) + 1)))
    again = run_compare(config)
    assert again.ran == ["perturb-s0"] and "model_version" in again.reasons["perturb-s0"]


def test_ldm_in_pixel_space_trains_no_autoencoder(cache, tmp_path):
    out = tmp_path / "cmp"
    given = dict(generator="ldm", space="pixel", conditions=("perturb",), features=False)
    result = run_compare(smoke(cache, out, **given))
    assert result.ran == ["perturb-s0"] and not (out / "vae").exists()
    deps = json.loads((out / "_manifests/perturb-s0.json").read_text())["deps"]
    assert "vae" not in {d["name"] for d in deps}
    (run,) = (out / "runs/perturb-s0").glob("000-ldm/*.pt")
    assert torch.load(run, weights_only=True)["arch"]["space"] == "pixel"
    assert "--space pixel" in (out / "report.md").read_text()  # the command that reproduces it
    assert run_compare(smoke(cache, out, **given)).ran == []
    assert run_compare(smoke(cache, out, **{**given, "space": "latent"})).ran == ["vae", "perturb-s0"]


def test_cli_runs_and_prints_the_table(cache, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--cache", str(cache), "--out", str(out), "--conditions", "perturb", "--seeds", "0"]
    result = runner.invoke(app, [*args, *SMOKE])
    assert result.exit_code == 0, result.output
    assert "| perturb | 1 |" in result.output and "| chance |" in result.output
    assert f"-> {out / 'report.md'}" in result.output
    dry = runner.invoke(app, [*args, *SMOKE, "--steps", "5", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "perturb-s0: would run: params changed: train.steps" in dry.output
    partial = runner.invoke(app, [*args, *SMOKE, "--allow-partial", "--dry-run"])
    assert partial.exit_code == 0, partial.output
    assert '"allow_partial": true' in partial.output and "perturb-s0: up to date" in partial.output  # unkeyed


def test_cli_features_only_trains_nothing(cache, tmp_path):
    out = tmp_path / "features"
    result = runner.invoke(
        app,
        ["compare", "--cache", str(cache), "--out", str(out), "--conditions", "perturb,caption"]
        + ["--features-only", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "features.md").is_file() and (out / "similarity_histograms.png").is_file()
    assert "perturb" in result.output and not (out / "runs").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--conditions", "perturb,bogus"], "--conditions bogus"),
        (["--seeds", "a,b"], "--seeds a,b"),
        (["--seeds", "0,0"], "--seeds"),
        (["--preset", "huge"], "--preset huge"),
        (["--generator", "vae"], "--generator vae"),
        (["--space", "pixel"], "--space pixel: latent, or pixel with --generator ldm"),
        (["--generator", "ldm", "--space", "voxel"], "--space voxel"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--size", "huge"], "--size huge"),
        (["--conditions", "optimize"], "--condition optimize needs the optimize stage"),
        (["--conditions", "fewshot:lots"], "--conditions fewshot:lots: give fewshot:P"),
        (["--conditions", "scratch:2.5"], "--conditions scratch:2.5"),
        (["--conditions", "fewshot:4", "--finetune-share", "1"], "--finetune-share"),
        (["--conditions", "semi:4", "--language-free", "caption"], "--language-free caption"),
        (["--conditions", "fewshot:4", "--language-free", "bogus"], "--language-free bogus"),
        (["--conditions", "fewshot:4", "--steps", "1"], "needs at least 2"),
    ],
)
def test_cli_bad_flags_are_one_line(cache, tmp_path, extra, message):
    args = ["compare", "--cache", str(cache), "--out", str(tmp_path / "cmp"), "--device", "cpu", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "cmp" / "runs").exists()


def test_cells_and_chance_levels():
    assert stats([0.5, 0.7, None]) == {"mean": 0.6, "std": 0.1414, "min": 0.5, "max": 0.7, "n": 2}
    assert cell(stats([0.5, 0.7])) == "0.600 ± 0.141 (0.500-0.700)" and cell(stats([0.5])) == "0.500"
    assert cell(stats([None])) == "-"
    chance, source = chance_levels({"n": 200, "seed": 0})
    assert "uniform guessing" in source
    assert chance["acc"]["shape"] == pytest.approx(1 / 6, abs=1e-4)
    assert chance["acc"]["size"] == pytest.approx(0.5, abs=1e-4)
    assert 0.2 <= chance["acc"]["position"] <= 0.4  # k/5 for prompts naming k = 1 or 2 objects
    given, source = chance_levels({"attribute_accuracy_seen_pairs_chance": {"shape": 0.1, "colour": 0.2}})
    assert source.startswith("eval.json") and given["acc_seen"] == {"shape": 0.1, "colour": 0.2}
