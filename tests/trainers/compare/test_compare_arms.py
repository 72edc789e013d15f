"""`trainers compare`'s few-shot arms (fewshot:P, scratch:P, semi:P): equal budgets, identical pair
subsets, a pre-training shared across P, the Figure 4 section and figure, gan and ldm from the CLI (bad
arm flags: tests/trainers/compare/test_compare.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from factories import tiny_cache
from PIL import Image
from typer.testing import CliRunner

from cli.trainers import app
from core.errors import ConfigError
from trainers.compare.arms import Arm, parse_arm, split_budget
from trainers.compare.config import CompareConfig
from trainers.compare.run import run_compare

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

runner = CliRunner()
N_IMAGES = 16  # tiny_cache's


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("arms-cache"), n=N_IMAGES)


def smoke(cache, out, **given) -> CompareConfig:
    # tiny_cache has the embed stage only: perturb is its language-free condition
    values = dict(cache=cache, out=out, seeds=(0,), device="cpu", language_free="perturb", features=False)
    return CompareConfig.from_preset("smoke", **{**values, **given})


def manifest(out, name) -> dict:
    return json.loads((out / "_manifests" / f"{name}.json").read_text())


def test_arm_specs_parse_and_resolve():
    assert parse_arm("optimize") is None and parse_arm("optimize:v2") is None
    assert parse_arm("fewshot:20") == Arm("fewshot", "20") and Arm("fewshot", "20").pairs(5) == 20
    assert Arm("scratch", "0.01").pairs(2000) == 20 and Arm("semi", "0.001").pairs(100) == 1  # at least one
    assert Arm("semi", "1").pairs(7) == 1 and Arm("semi", "1.0").pairs(7) == 7  # a count vs all of them
    for bad in ("fewshot:", "fewshot:0", "fewshot:-3", "scratch:1.5", "semi:abc", "fewshot:0.0"):
        with pytest.raises(ConfigError, match="a count of pairs"):
            parse_arm(bad)
    assert split_budget(1000, 0.25) == (750, 250) and split_budget(2, 0.25) == (1, 1)
    assert split_budget(3, 0.9) == (1, 2) and sum(split_budget(7, 0.5)) == 7


@pytest.fixture(scope="module")
def armed(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("armed")
    config = smoke(cache, out, conditions=("perturb", "caption", "fewshot:4", "scratch:4", "semi:0.25"))
    return config, run_compare(config)


def test_arms_share_one_budget_and_the_same_pairs(armed):
    config, result = armed
    out = config.out
    assert result.ran == [
        "pretrain-s0",
        "perturb-s0",
        "caption-s0",
        "fewshot.4-s0",
        "scratch.4-s0",
        "semi.0.25-s0",
    ]
    steps = {name: manifest(out, name)["params"]["train"]["steps"] for name in result.ran}
    assert steps["pretrain-s0"] + steps["fewshot.4-s0"] == config.steps == steps["scratch.4-s0"]
    assert steps["semi.0.25-s0"] == steps["perturb-s0"] == config.steps
    assert {r["condition"]: r["steps"] for r in result.rows} == dict.fromkeys(config.conditions, config.steps)

    fewshot, scratch = manifest(out, "fewshot.4-s0"), manifest(out, "scratch.4-s0")
    assert fewshot["pairs"]["n"] == scratch["pairs"]["n"] == 4
    assert fewshot["pairs"]["digest"] == scratch["pairs"]["digest"]
    keys = [(out / m["pairs"]["file"]).read_text().split() for m in (fewshot, scratch)]
    assert keys[0] == keys[1] and len(set(keys[0])) == 4
    assert {d["name"] for d in fewshot["deps"]} >= {"init", "probe"}
    init = next(d["digest"] for d in fewshot["deps"] if d["name"] == "init")
    pretrain = manifest(out, "pretrain-s0")
    assert init == next(o["digest"] for o in pretrain["outs"] if o["path"] == pretrain["checkpoint"])
    tuned = json.loads((out / fewshot["checkpoint"]).parent.joinpath("config.json").read_text())
    assert tuned["init"] == str(out / pretrain["checkpoint"]) and tuned["condition"] == "caption"

    semi = manifest(out, "semi.0.25-s0")  # 25 % of 16 images keep their captions among perturb's features
    semi_data = json.loads((out / semi["checkpoint"]).parent.joinpath("config.json").read_text())["data"]
    assert semi["pairs"]["n"] == 4 and semi_data["condition"] == "perturb"
    assert semi_data["n_images"] == N_IMAGES


def test_the_figure_and_the_few_shot_section_are_written(armed):
    config, result = armed
    out = config.out
    with Image.open(out / "fewshot.png") as image:
        image.load()
        assert image.format == "PNG" and image.size >= (800, 300)
    report = (out / "report.md").read_text()
    assert "## Few-shot and semi-supervised arms" in report and "](fewshot.png)" in report
    for row in (
        "| fewshot:4 | 4 | 1 |",
        "| scratch:4 | 4 | 1 |",
        "| semi:0.25 | 4 | 1 |",
        "| caption | all |",
    ):
        assert row in report, row
    assert "`fewshot:4` vs `scratch:4`:" in report
    fewshot = json.loads((out / "results.json").read_text())["fewshot"]
    assert fewshot["arms"]["fewshot"] == [{"pairs": 4, "condition": "fewshot:4"}]
    assert fewshot["references"] == {"language-free only": "perturb", "fully supervised": "caption"}
    csv_head = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"pairs", "acc_mean", "train_steps", "pairs_digest"} <= set(csv_head)


def test_changing_p_reuses_the_pre_training(armed):
    config, _ = armed
    out = config.out
    before = manifest(out, "pretrain-s0")
    again = run_compare(smoke(config.cache, out, conditions=("fewshot:4", "fewshot:6", "scratch:6")))
    assert again.ran == ["fewshot.6-s0", "scratch.6-s0"]
    assert again.up_to_date == ["fewshot.4-s0"] and manifest(out, "pretrain-s0") == before
    assert manifest(out, "fewshot.6-s0")["pairs"]["n"] == 6

    longer = run_compare(smoke(config.cache, out, conditions=("fewshot:4",), finetune_share=0.5, steps=4))
    assert longer.ran == ["pretrain-s0", "fewshot.4-s0"]  # the split changed: a new pre-training
    assert manifest(out, "pretrain-s0")["params"]["train"]["steps"] == 2


def test_a_second_seed_draws_other_pairs(cache, tmp_path):
    result = run_compare(smoke(cache, tmp_path / "cmp", conditions=("scratch:4",), seeds=(0, 1)))
    digests = [manifest(tmp_path / "cmp", name)["pairs"]["digest"] for name in result.ran]
    assert len(digests) == 2 and digests[0] != digests[1]


@pytest.mark.parametrize("generator", ["gan", "ldm"])
def test_cli_runs_every_arm(cache, tmp_path, generator):
    out = tmp_path / "cmp"
    args = ["compare", "--cache", str(cache), "--out", str(out), "--generator", generator]
    args += ["--conditions", "fewshot:0.25,scratch:0.25,semi:2", "--seeds", "0", "--language-free", "perturb"]
    args += ["--preset", "smoke", "--steps", "4", "--device", "cpu"]  # fewshot: 3 steps + 1
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| fewshot:0.25 | 1 |" in result.output and "| semi:2 | 1 |" in result.output
    names = {p.stem for p in (out / "_manifests").glob("*.json")}
    expected = {"pretrain-s0", "fewshot.0.25-s0", "scratch.0.25-s0", "semi.2-s0"}
    assert names == (expected | {"vae"} if generator == "ldm" else expected)
    assert (out / "fewshot.png").is_file()
    dry = runner.invoke(app, [*args, "--finetune-share", "0.5", "--dry-run"])  # 2 + 2
    assert dry.exit_code == 0, dry.output
    assert "pretrain-s0: would run: params changed: train.steps" in dry.output
    assert "fewshot.0.25-s0: would run: its pre-training (pretrain-s0) is trained first" in dry.output
    assert "scratch.0.25-s0: up to date" in dry.output


def test_gap_closed_needs_a_gap_beyond_the_seed_spread():
    from types import SimpleNamespace

    from trainers.compare.fewshot import gap_closed

    def result(lf, sup, arm, spread=0.0):
        summary = {
            c: {"acc_mean": {"mean": m, "std": spread}}
            for c, m in (("optimize", lf), ("caption", sup), ("fewshot:20", arm))
        }
        return SimpleNamespace(summary=summary)

    config = SimpleNamespace(language_free="optimize")
    assert gap_closed(config, result(0.40, 0.60, 0.50), "fewshot:20") == 0.5
    assert gap_closed(config, result(0.40, 0.60, 0.70), "fewshot:20") == 1.5  # beyond supervised
    assert gap_closed(config, result(0.40, 0.405, 0.50), "fewshot:20") is None  # within MIN_GAP
    assert gap_closed(config, result(0.40, 0.45, 0.50, spread=0.06), "fewshot:20") is None  # within noise
    assert gap_closed(config, result(0.45, 0.40, 0.50), "fewshot:20") is None  # supervised is not above


@pytest.mark.parametrize(
    "point, committed",
    [
        ("compare:pretrain-s0:before_manifest", []),  # pre-trained, not committed
        ("compare:fewshot.4-s0:before_manifest", ["pretrain-s0"]),  # fine-tuned and evaluated
    ],
)
def test_sigkill_in_an_arm_then_rerun_commits_every_unit_once(cache, tmp_path, point, committed):
    out = tmp_path / "cmp"
    args = ["compare", "--cache", str(cache), "--out", str(out), "--conditions", "fewshot:4", "--seeds", "0"]
    args += ["--language-free", "perturb", "--preset", "smoke", "--device", "cpu"]
    env = {**os.environ, "PIPELINE_CRASH_AT": point, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-c", "from cli.trainers import main; main()"]
    killed = subprocess.run([*cli, *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.stem for p in (out / "_manifests").glob("*.json")) == committed

    rerun = run_compare(smoke(cache, out, conditions=("fewshot:4",)))
    assert rerun.ran == [u for u in ("pretrain-s0", "fewshot.4-s0") if u not in committed]
    assert sorted(p.name for p in (out / "runs" / "pretrain-s0").iterdir()) == ["000-gan"]  # made once
    assert sorted(p.name for p in (out / "runs" / "fewshot.4-s0").iterdir() if p.name.endswith("-gan")) == [
        "000-gan"
    ]
    init = next(d["digest"] for d in manifest(out, "fewshot.4-s0")["deps"] if d["name"] == "init")
    pretrain = manifest(out, "pretrain-s0")
    assert init == next(o["digest"] for o in pretrain["outs"] if o["path"] == pretrain["checkpoint"])
