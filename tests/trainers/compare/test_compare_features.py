"""trainers.compare.features: the feature-level comparison writes its three files, its figures are in
range and agree with the optimize stage's own stats, and a method whose stage is missing is skipped."""

from __future__ import annotations

import json
import shutil

import pytest
from factories import tiny_cache
from PIL import Image

from core.errors import ConfigError
from feature_cache import embed_rows
from pipeline.optimize.config import OptimizeConfig
from pipeline.optimize.stage import run_optimize
from pipeline.retrieve.config import RetrieveConfig
from pipeline.retrieve.stage import run_retrieve
from trainers.compare.features import METHODS, TOP1_BATCH, feature_report

N = 16


@pytest.fixture(scope="module")
def caches(tmp_path_factory, one_torch_thread):
    """The tiny synthetic cache embedded only, and a copy with retrieve and optimize run on it."""
    root = tmp_path_factory.mktemp("compare-features")
    embed_only = tiny_cache(root, n=N)
    full = root / "full"
    shutil.copytree(embed_only, full)
    corpus = root / "w" / "captions.txt"
    run_retrieve(RetrieveConfig.from_options(captions=[str(corpus)], cache=full, k=4, device="cpu"))
    run_optimize(OptimizeConfig(cache=full, steps=5, device="cpu", precision="fp32"))
    return {"embed_only": embed_only, "full": full}


def _in_range(row):
    assert -1.0 <= row["cos_image"] <= 1.0
    assert 0.0 <= row["top1"] <= 1.0
    for name, value in row["attribute_precision"].items():
        assert value is None or name == "n" or 0.0 <= value <= 1.0


def test_every_method_on_a_full_cache(caches, tmp_path):
    out = tmp_path / "features"
    report = feature_report(caches["full"], out, device="cpu")
    assert set(report["methods"]) == set(METHODS)
    assert json.loads((out / "features.json").read_text()) == report
    with Image.open(out / "similarity_histograms.png") as png:
        png.load()
        assert png.size[0] > 500 and png.size[1] > 200
    md = (out / "features.md").read_text()
    for method in METHODS:
        row = report["methods"][method]
        assert row["status"] == "ok", row
        assert row["n"] == N and row["top1_chance"] == pytest.approx(1 / N)  # one batch (N < 256)
        _in_range(row)
        assert row["attribute_precision"]["n"] == N
        assert f"| {method} | {N} |" in md
    assert report["top1_batch_size"] == TOP1_BATCH and "| chance |" in md
    assert report["methods"]["caption"]["text_text"] is None  # a caption against itself says nothing
    for method in ("perturb", "retrieve", "optimize"):
        text = report["methods"][method]["text_text"]
        assert text["n"] == N and -1.0 <= text["same"] <= 1.0 and -1.0 <= text["random"] <= 1.0
    series = report["histograms"]["series"]
    assert sum(series["optimize/image"]["counts"]) == N and "caption/random_real_pair" in series

    # The modality gap and where each feature sits between the cones (the partial world: 5 captions each).
    gap = report["modality_gap"]
    assert gap["length"] > 0 and gap["text_text_n"] == N
    assert gap["image_along_gap"] > gap["caption_along_gap"]  # g points from the captions to the images
    for name in ("cos_image_own_caption", "text_text_same_image", "text_text_random_image"):
        assert -1.0 <= gap[name] <= 1.0, name
    assert gap["length"] == pytest.approx(gap["image_along_gap"] - gap["caption_along_gap"], abs=1e-5)
    cone = report["methods"]["caption"]["cone"]
    assert cone["along_gap"] == pytest.approx(gap["caption_along_gap"], abs=1e-5)  # the captions' own cone
    for method in METHODS:
        assert set(report["methods"][method]["cone"]) == {"along_gap", "cos_image_mean", "cos_caption_mean"}
    assert "Modality gap of the cache's CLIP" in md and "along gap |" in md

    # The optimize row scores the stored pseudo features like the stage's stats score its output.
    stats = [
        json.loads(p.read_text()) for p in sorted((caches["full"] / "optimize" / "_stats").glob("*.json"))
    ]
    precision = report["methods"]["optimize"]["attribute_precision"]
    for name in ("shape", "colour", "size", "position", "object", "mean"):
        stage = sum(s["attr_precision_final"][name] * s["attr_precision_final"]["n"] for s in stats) / N
        assert precision[name] == pytest.approx(stage, abs=1e-5)


def test_missing_stages_are_skipped_with_the_reason(caches, tmp_path):
    report = feature_report(caches["embed_only"], tmp_path / "f", device="cpu", max_images=10)
    assert report["n_evaluated"] == 10 and report["n_images"] == N
    for method in ("optimize", "retrieve"):
        row = report["methods"][method]
        assert row["status"] == "skipped" and f"pipeline {method}" in row["reason"]
        assert f"`{method}` skipped" in (tmp_path / "f" / "features.md").read_text()
    for method in ("perturb", "caption"):
        row = report["methods"][method]
        assert row["status"] == "ok" and row["n"] == 10
        assert row["attribute_precision"] is None  # no caption corpus to find a nearest caption in
    assert "pipeline retrieve" in report["attribute_precision_note"]
    Image.open(tmp_path / "f" / "similarity_histograms.png").verify()


def test_caption_needs_captions(caches, tmp_path, monkeypatch):
    read_embed = embed_rows.read_embed

    def without_captions(cache):
        rows = read_embed(cache)
        rows.captions = [None] * len(rows)
        return rows

    monkeypatch.setattr(embed_rows, "read_embed", without_captions)
    report = feature_report(caches["full"], tmp_path / "f", methods=("caption", "optimize"), device="cpu")
    assert report["methods"]["caption"] == {
        "status": "skipped",
        "reason": "no image in the cache has a caption",
    }
    assert report["methods"]["optimize"]["status"] == "ok"
    assert report["methods"]["optimize"]["text_text"] is None
    assert (tmp_path / "f" / "similarity_histograms.png").is_file()


def test_unknown_methods_are_refused(caches, tmp_path):
    with pytest.raises(ConfigError, match="choose from"):
        feature_report(caches["full"], tmp_path / "f", methods=("optimise",), device="cpu")


def test_the_real_caption_reference_is_plotted_even_when_caption_is_not_compared(caches, tmp_path):
    report = feature_report(caches["full"], tmp_path / "f", methods=("perturb",), device="cpu")
    assert "caption" not in report["methods"]
    series = report["histograms"]["series"]
    assert series["caption/image"]["n"] > 0 and "perturb/image" in series
