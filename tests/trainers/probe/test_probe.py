"""trainers.probe.probe: the attribute classifier is an accurate instrument, its scoring is right, its file
round-trips, and `trainers probe` works from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import TINY_CLIP, flip_middle
from typer.testing import CliRunner

from cli.trainers import app
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import run_embed
from trainers.probe import probe as probe_module
from trainers.probe.config import ProbeConfig
from trainers.probe.probe import (
    cached_probe,
    load_probe,
    render,
    save_probe,
    score_objects,
    summarise,
    train_probe,
)
from world.synth import SynthConfig, run_synth

runner = CliRunner()
SMALL = ProbeConfig(image_size=32, n_train=3000, epochs=5, n_eval=300, seed=0, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def probe():
    return train_probe(SMALL)


def test_probe_is_accurate_on_held_out_images_at_32px(probe):
    one = probe.accuracy["one_object"]
    assert one["colour"] >= 0.95 and one["shape"] >= 0.9, one
    assert one["size"] >= 0.9 and one["position"] >= 0.95 and one["count"] >= 0.95, one
    both = probe.accuracy["all"]  # one- and two-object images
    assert both["shape"] >= 0.85 and both["colour"] >= 0.95 and both["count"] >= 0.9, both


def test_probe_fails_on_noise_and_on_the_wrong_prompt(probe):
    pixels, objects = render(12345, range(200), 32, 1)
    right = summarise(score_objects(probe.predict(pixels), objects))
    rolled = objects[1:] + objects[:1]  # every image scored against another image's objects
    wrong = summarise(score_objects(probe.predict(pixels), rolled))
    noise = torch.randint(0, 256, pixels.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noisy = summarise(score_objects(probe.predict(noise), objects))
    for attribute in ("shape", "colour"):
        assert right[attribute] > 0.9 and wrong[attribute] < 0.5 and noisy[attribute] < 0.5, attribute
    assert right["position"] > 0.9 and noisy["position"] < 0.5


def _predictions(presence, shape, colour, size):
    return {
        "presence": np.array([presence], dtype=np.float32),
        "shape": np.array([shape]),
        "colour": np.array([colour]),
        "size": np.array([size]),
    }


def test_score_objects_reads_the_named_slot_or_the_most_confident_one():
    # slots: left, right, top, bottom, centre. A red (0) star (3), small (0), drawn on the left.
    pred = _predictions([0.9, 0.1, 0.2, 0.1, 0.1], [3, 0, 0, 0, 0], [0, 5, 5, 5, 5], [0, 1, 1, 1, 1])
    star = {"shape": "star", "colour": "red", "size": "small", "position": "left"}
    scores = score_objects(pred, [[star]])
    assert all(scores[a] == [True] for a in ("shape", "colour", "size", "position", "count", "all"))
    misplaced = score_objects(pred, [[{**star, "position": "right"}]])
    assert misplaced["position"] == [False] and misplaced["colour"] == [True] and misplaced["all"] == [False]
    partial = score_objects(pred, [[{"colour": "red"}]])  # a prompt naming only a colour
    assert partial["colour"] == [True] and partial["shape"] == [] and partial["position"] == []
    clutter = _predictions([0.9] * 5, [0] * 5, [1] * 5, [1] * 5)  # every slot lit, as noise does
    scored = score_objects(clutter, [[{**star, "position": "centre"}]])
    assert scored["position"] == [False] and scored["count"] == [False]  # only the top-1 slot counts
    assert score_objects(pred, [[]]) == {
        a: [] for a in ("shape", "colour", "size", "position", "count", "all")
    }


def test_probe_file_round_trips_with_weights_only(probe, tmp_path):
    path = save_probe(probe, tmp_path / "probe.pt")
    state = torch.load(path, weights_only=True)
    assert state["kind"] == "probe" and state["config"]["image_size"] == 32
    loaded = load_probe(path, "cpu")
    pixels, _ = render(7, range(16), 32, 2)
    a, b = probe.predict(pixels), loaded.predict(pixels)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert loaded.accuracy == probe.accuracy


def test_cached_probe_trains_once_per_cache(tmp_path, monkeypatch):
    world = tmp_path / "world"
    run_synth(SynthConfig(out=world, n=6, shard_size=6, n_captions=40, image_size=32))
    cache = tmp_path / "cache"
    run_embed(
        EmbedConfig(
            inputs=(str(world / "00000.tar"),),
            cache=cache,
            clip_model=TINY_CLIP,
            clip_pretrained="",
            image_size=32,
            workers=0,
        )
    )
    config = ProbeConfig(image_size=0 + 16, n_train=64, epochs=1, n_eval=0, device="cpu")
    first, path = cached_probe(cache, config)
    assert first.config.image_size == 32  # the cache's size, not the config's
    assert path.parent == cache / "_trainers" and path.is_file()
    monkeypatch.setattr(probe_module, "train_probe", lambda *a, **k: pytest.fail("probe retrained"))
    again, same = cached_probe(cache, config)
    assert same == path and again.config == first.config

    monkeypatch.undo()
    flip_middle(path, 64)  # same-size damage: still a loadable torch file
    with pytest.warns(UserWarning, match="probe-.*: cannot be read .*damaged.*; retraining it"):
        remade, _ = cached_probe(cache, config)
    assert remade.config == first.config and probe_module.load_probe(path, "cpu").config == first.config


def test_probe_cli_writes_the_file_and_its_accuracy(tmp_path):
    out = tmp_path / "p.pt"
    args = [
        "probe",
        "--image-size",
        "32",
        "--out",
        str(out),
        "--n-train",
        "200",
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "probe at 32px" in result.output
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["config"]["n_train"] == 200 and "one_object" in summary["accuracy"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["probe", "--out", "p.pt"], "--cache"),
        (["probe", "--cache", "nowhere", "--out", "p.pt"], "nowhere"),
        (["probe", "--image-size", "8", "--out", "p.pt"], "--image-size"),
    ],
)
def test_probe_cli_errors_are_one_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output
