"""Named optimize variants side by side in one cache, and the provenance every run records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from cli.pipeline import app

runner = CliRunner()
OPTIMIZE = ["optimize", "--steps", "3", "--batch-size", "16"]


def _invoke(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def _manifests(cache: Path, stage: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / stage / "_manifests").glob("*.json"))}


def test_a_variant_lives_beside_the_default_and_leaves_it_alone(ran_project):
    cache = ran_project / "cache"
    before = _manifests(cache, "optimize")
    output = _invoke(*OPTIMIZE, "--variant", "lafite", "--method", "perturb")
    assert "optimize-lafite: 3 shard(s) made" in output and "(perturb)" in output
    assert _manifests(cache, "optimize") == before
    assert len(_manifests(cache, "optimize-lafite")) == 3
    stages = {s["stage"]: s for s in json.loads(_invoke("status", "--json"))}
    assert stages["optimize"]["up_to_date"] == 3 and stages["optimize-lafite"]["up_to_date"] == 3
    assert "0 shard(s) made" in _invoke(*OPTIMIZE, "--variant", "lafite", "--method", "perturb")


def test_pipeline_toml_declares_variants_that_run_and_status_follow(ran_project):
    config = Path("pipeline.toml")
    config.write_text(config.read_text() + '\n[optimize.variants.lafite]\nmethod = "perturb"\nxi = 2.0\n')
    output = _invoke("run")
    assert "optimize: 0 shard(s) made" in output and "optimize-lafite: 3 shard(s) made" in output
    assert "optimize-lafite: 0 shard(s) made, 3 up to date" in _invoke("run")
    stages = {s["stage"]: s for s in json.loads(_invoke("status", "--json"))}
    assert stages["optimize-lafite"] == {"stage": "optimize-lafite", "up_to_date": 3, "stale": {}, "note": ""}
    config.write_text(config.read_text().replace("xi = 2.0", "xi = 1.0"))
    stages = {s["stage"]: s for s in json.loads(_invoke("status", "--json"))}
    assert set(stages["optimize-lafite"]["stale"].values()) == {"params changed: xi"}
    config.write_text(config.read_text() + "\n[optimize.variants.bad]\nnope = 1\n")
    assert "[optimize.variants.bad] unknown key 'nope'" in _invoke("status", code=2)


def _dataset(cache: Path, condition: str):
    """The sample set read from the cache (not a stored one: `_cos` needs its image features)."""
    from trainers.data.loader import LoaderConfig, read_dataset

    return read_dataset(LoaderConfig(cache=cache, condition=condition, batch_size=4))


def _cos(dataset) -> float:
    img = dataset.rows.img_emb[dataset.rows_idx].astype(np.float32)
    cond = dataset.cond.astype(np.float32)
    return float(
        np.mean(np.sum(img * cond, axis=1) / np.linalg.norm(img, axis=1) / np.linalg.norm(cond, axis=1))
    )


def test_trainers_read_a_variant_and_record_its_provenance(ran_project):
    cache = ran_project / "cache"
    _invoke(*OPTIMIZE, "--variant", "lafite", "--method", "perturb")
    default, default_info = _dataset(cache, "optimize")
    lafite, lafite_info = _dataset(cache, "optimize:lafite")
    assert default_info.provenance["method"] == "optimize" and default_info.provenance["variant"] == ""
    assert (
        lafite_info.provenance["stage"] == "optimize-lafite" and lafite_info.provenance["method"] == "perturb"
    )
    assert lafite_info.provenance["params"]["xi"] == 3.0
    assert _cos(default) != _cos(lafite)
    assert lafite_info.record()["provenance"] == lafite_info.provenance

    # --condition optimize on a cache whose default variant was restaged as perturb says perturb
    _invoke(*OPTIMIZE, "--method", "perturb", "--force")
    _, restaged = _dataset(cache, "optimize")
    assert restaged.provenance["method"] == "perturb"
    assert restaged.provenance["manifests_digest"] != default_info.provenance["manifests_digest"]


def test_an_unknown_variant_names_the_command_that_makes_it(ran_project):
    from cli.trainers import app as trainers_app

    args = ["gan", "--cache", "cache", "--size", "tiny", "--steps", "1", "--condition", "optimize:nope"]
    result = runner.invoke(trainers_app, args)
    assert result.exit_code == 2 and "pipeline optimize --variant nope --cache cache" in result.output
    result = runner.invoke(trainers_app, [*args[:-1], "perturb:x"])
    assert result.exit_code == 2 and "optimize:VARIANT" in result.output
    assert "--variant a-b: use letters, digits and _ only" in _invoke(*OPTIMIZE, "--variant", "a-b", code=2)


def test_two_gans_train_from_two_variants_at_the_same_time(ran_project):
    _invoke(*OPTIMIZE, "--variant", "lafite", "--method", "perturb")
    cli = [sys.executable, "-c", "from cli.trainers import app; app()"]
    runs = []
    for condition, name in (("optimize", "a"), ("optimize:lafite", "b")):
        args = ["gan", "--cache", "cache", "--out", "runs", "--name", name, "--size", "tiny", "--steps", "2"]
        args += ["--batch-size", "4", "--sample-every", "0", "--device", "cpu", "--condition", condition]
        runs.append(
            subprocess.Popen([*cli, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    for proc in runs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    configs = {p.parent.name: json.loads(p.read_text()) for p in Path("runs").glob("*/config.json")}
    methods = {name.split("-", 1)[1]: c["data"]["provenance"]["method"] for name, c in configs.items()}
    assert methods == {"a": "optimize", "b": "perturb"}


def test_compare_plans_a_variant_beside_the_default(ran_project):
    from cli.trainers import app as trainers_app

    _invoke(*OPTIMIZE, "--variant", "lafite", "--method", "perturb")
    args = ["compare", "--cache", "cache", "--out", "cmp", "--conditions", "optimize,optimize:lafite"]
    result = runner.invoke(trainers_app, [*args, "--seeds", "0", "--preset", "smoke", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "optimize-s0" in result.output and "optimize.lafite-s0" in result.output
