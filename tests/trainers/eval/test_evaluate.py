"""`trainers eval`: every field is written, and the metrics order an oracle, real images and noise."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from bad_torch_files import bad_torch_files
from factories import TINY_CLIP, image_bytes
from PIL import Image
from typer.testing import CliRunner

from cli.trainers import app
from core.errors import ConfigError
from feature_cache.embed_rows import read_embed
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import run_embed
from trainers.data.conditions import load_cache_clip
from trainers.eval import evaluate as evaluate_module
from trainers.eval import features as eval_features
from trainers.eval.config import EvalConfig
from trainers.eval.evaluate import evaluate, synthetic_prompts
from trainers.probe.config import ProbeConfig
from trainers.probe.probe import save_probe, score_objects, summarise, train_probe
from trainers.probe.prompts import attributes_named
from world.grammar import parse_caption
from world.labels import labels
from world.synth import Scene, SynthConfig, _place, render_scene, run_synth, sample_scene

runner = CliRunner()
N = 80
INFO = {"clip_model": TINY_CLIP, "clip_pretrained": "", "config": {"paired_fraction": 0.25}, "h_dim": 64}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    world = tmp_path_factory.mktemp("world")
    run_synth(SynthConfig(out=world, n=40, shard_size=20, n_captions=40, image_size=32))
    cache = tmp_path_factory.mktemp("cache")
    config = EmbedConfig(
        inputs=(str(world / "*.tar"),),
        cache=cache,
        clip_model=TINY_CLIP,
        clip_pretrained="",
        image_size=32,
        workers=0,
    )
    run_embed(config)
    return cache


@pytest.fixture(scope="module")
def probe():
    return train_probe(ProbeConfig(image_size=32, n_train=2000, epochs=4, n_eval=0, device="cpu"))


@pytest.fixture(scope="module")
def oracle(cache):
    """Draws exactly what each prompt says: finds the prompt by its CLIP text feature, renders its objects."""
    prompts = synthetic_prompts(N, 0, partial=True)  # as eval draws them on the (partial) world
    bundle = load_cache_clip(read_embed(cache).clip, "cpu")
    from core.clip import encode_texts

    text = encode_texts(bundle, prompts)

    def generate(cond, seed):
        images = []
        for i, row in enumerate(cond):
            prompt = prompts[int((text @ row).argmax())]
            rng = __import__("random").Random(f"{seed}/{i}")
            objects = completed(parse_caption(prompt), rng)
            background = sample_scene(seed, i).background
            scene = Scene(objects, _place(objects, rng), background, prompt)
            pixels = np.asarray(render_scene(scene, 32, np.random.default_rng([seed, i])))
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        return torch.stack(images)

    return generate


def completed(objects, rng):
    """The partial world's prompt objects with what they leave out drawn at random (positions distinct)."""
    vocab = labels().vocabulary
    free = [p for p in vocab["position"] if p not in {o.get("position") for o in objects}]
    rng.shuffle(free)
    full = []
    for obj in objects:
        drawn = {a: rng.choice(vocab[a]) for a in vocab if a != "position"}
        full.append({**drawn, "position": obj.get("position") or free.pop(), **obj})
    return full


def test_partial_prompts_name_one_to_four_attributes_and_are_counted_per_attribute():
    prompts = synthetic_prompts(200, 0, 2, partial=True)
    targets = [parse_caption(p) for p in prompts]
    named = attributes_named(targets)
    assert set(named["k_attributes"]) == {"1", "2", "3", "4"}
    for attribute in ("shape", "colour", "size", "position"):
        assert named[attribute] == sum(any(attribute in o for o in objs) for objs in targets)
        assert 0 < named[attribute] < 200
    for objects in targets[:4]:  # one per held-out pair: its colour and shape always named
        assert {"colour", "shape"} <= set(objects[0])
    assert synthetic_prompts(40, 0, 2) == synthetic_prompts(40, 0, 2, partial=False)  # the full world's


def test_accuracy_counts_only_the_attributes_a_prompt_names():
    # one image: a small red star on the left (slot 0); prompts name some attributes, some wrongly
    pred = {
        "presence": np.array([[0.9, 0.1, 0.1, 0.1, 0.1]] * 3, dtype=np.float32),
        "shape": np.array([[3, 0, 0, 0, 0]] * 3),
        "colour": np.array([[0, 5, 5, 5, 5]] * 3),
        "size": np.array([[0, 1, 1, 1, 1]] * 3),
    }
    targets = [[{"colour": "red"}], [{"shape": "circle", "position": "left"}], [{"size": "small"}]]
    scores = summarise(score_objects(pred, targets))
    assert scores["colour"] == 1.0 and scores["size"] == 1.0  # each counted on the one prompt naming it
    assert scores["shape"] == 0.0 and scores["position"] == 1.0
    assert scores["all"] == 0.6667 and scores["n_objects"] == 3  # rounded to 4 places
    named = attributes_named(targets)
    assert {a: named[a] for a in ("shape", "colour", "size", "position")} == {
        "shape": 1, "colour": 1, "size": 1, "position": 1
    }  # fmt: skip
    assert named["k_attributes"] == {"1": 2, "2": 1}


@pytest.fixture(scope="module")
def real_images(cache):
    rows = read_embed(cache)

    def generate(cond, seed):
        return rows.pixels(np.random.default_rng(seed).integers(0, len(rows), len(cond)))

    return generate


def noise(cond, seed):
    return torch.randint(
        0, 256, (len(cond), 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def run(cache, tmp_path, name, generate, probe, n=N, **kwargs):
    config = EvalConfig(
        checkpoint=f"{name}.pt", cache=cache, out=tmp_path / name, n=n, device="cpu", **kwargs
    )
    return evaluate(config, generate, INFO, probe=probe)


@pytest.fixture(scope="module")
def results(cache, oracle, real_images, probe, tmp_path_factory):
    out = tmp_path_factory.mktemp("evals")
    return {
        name: run(cache, out, name, generate, probe)
        for name, generate in (("oracle", oracle), ("real", real_images), ("noise", noise))
    }


def test_eval_writes_every_field(results, tmp_path_factory):
    result = results["oracle"]
    out = tmp_path_factory.getbasetemp()
    written = json.loads(next(out.glob("evals*/oracle/eval.json")).read_text())
    assert written == json.loads(json.dumps(result))
    for key in (
        "fid",
        "fid_features",
        "fid_clip",
        "clip_score",
        "clip_score_real",
        "n",
        "prompts",
        "checkpoint",
    ):
        assert written[key] is not None, key
    assert written["fid_features"] == f"clip:{TINY_CLIP}" and written["fid_inception"] is None
    assert written["checkpoint"] == "oracle.pt" and written["n"] == N and written["n_real"] == 40
    assert (
        written["prompts"]["source"].startswith("synthetic (seed 0, 1-2 objects")
        and written["prompts"]["naming_held_out_pairs"] >= 4
    )
    assert written["paired"] == {"paired_fraction": 0.25}
    for key in ("attribute_accuracy", "attribute_accuracy_held_out_pairs", "attribute_accuracy_seen_pairs"):
        assert set(written[key]) >= {"shape", "colour", "size", "position", "count", "all", "n_objects"}, key
    assert written["attribute_accuracy_real"]["colour"] > 0.9  # the instrument reads the cache's images
    grid = Image.open(written["grid"]["file"])
    assert grid.size == (8 * 34 + 2, 8 * 34 + 2)  # 64 images of 32 px, 8 per row, 2 px gaps
    prompts_file = next(out.glob("evals*/oracle/grid_prompts.txt"))
    max_objects = written["prompts"]["max_objects"]
    assert prompts_file.read_text().splitlines() == synthetic_prompts(N, 0, max_objects, partial=True)[:64]
    assert "each naming 1-4 attributes" in written["prompts"]["source"]  # the partial world's prompts
    by_attribute = written["prompts"]["by_attribute"]
    assert all(0 < by_attribute[a] < N for a in ("shape", "colour", "size", "position")), by_attribute


def test_metrics_order_oracle_real_images_and_noise(results):
    oracle, real, noisy = results["oracle"], results["real"], results["noise"]
    assert real["fid"] < noisy["fid"] and oracle["fid"] < noisy["fid"]
    for attribute in ("colour", "shape", "position"):
        assert oracle["attribute_accuracy"][attribute] >= 0.8, oracle["attribute_accuracy"]
        assert noisy["attribute_accuracy"][attribute] <= 0.4, noisy["attribute_accuracy"]
        assert real["attribute_accuracy"][attribute] <= 0.5  # real images ignore the prompt
    assert oracle["attribute_accuracy_held_out_pairs"]["colour"] >= 0.8  # pairs no image has


def test_prompt_file_without_synthetic_captions_has_no_attribute_accuracy(cache, tmp_path, probe):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nhello world\n\nan empty room\n")
    result = run(cache, tmp_path, "free", noise, probe, prompts=prompts, grid=0)
    assert result["prompts"] == {
        "source": str(prompts),
        "unique": 2,
        "max_objects": None,
        "naming_held_out_pairs": 0,
        "by_objects": {"0": N},  # no prompt names an object
        "by_attribute": {"shape": 0, "colour": 0, "size": 0, "position": 0, "k_attributes": {"0": N}},
    }
    assert result["attribute_accuracy"] is None and result["probe"] is None
    assert not (tmp_path / "free" / "grid.png").exists() and (tmp_path / "free" / "eval.json").is_file()


def test_refusals(cache, tmp_path, probe, monkeypatch):
    with pytest.raises(ConfigError, match="was trained on features of CLIP lafite-small"):
        evaluate(EvalConfig("x", cache, tmp_path / "a", n=4), noise, {**INFO, "clip_model": "lafite-small"})
    with pytest.raises(ValueError, match="expected uint8"):
        run(cache, tmp_path, "bad", lambda cond, seed: torch.zeros(len(cond), 3, 32, 32), probe)
    with pytest.raises(ConfigError, match="--inception"):
        EvalConfig("x", cache, tmp_path / "b", inception=tmp_path / "missing.pt").validate()
    monkeypatch.setattr(eval_features, "CLEANFID_INCEPTION", tmp_path / "absent.pt")
    assert eval_features.inception_weights(None) is None  # never downloads: CLIP FID instead


@pytest.fixture
def fake_sampler(monkeypatch):
    module = types.ModuleType("trainers.families.load")
    calls = []

    def load_generator(ckpt_path, *, device="auto", steps=None, guidance=None):
        calls.append((str(ckpt_path), device))
        return noise, dict(INFO)

    module.load_generator = load_generator
    monkeypatch.setitem(sys.modules, "trainers.families.load", module)
    return calls


def test_eval_cli_writes_eval_json(cache, probe, tmp_path, fake_sampler):
    probe_file = save_probe(probe, tmp_path / "probe.pt")
    out = tmp_path / "out"
    args = [
        "eval",
        "--checkpoint",
        "run/0000100.pt",
        "--cache",
        cache,
        "--out",
        out,
        "--n",
        16,
        "--probe",
        probe_file,
    ]
    result = runner.invoke(app, [str(a) for a in args] + ["--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert fake_sampler == [("run/0000100.pt", "cpu")]
    written = json.loads((out / "eval.json").read_text())
    assert written["n"] == 16 and written["checkpoint"] == "run/0000100.pt" and (out / "grid.png").is_file()
    assert written["probe"]["file"] == str(probe_file)
    assert "eval: n=16" in result.output


@pytest.mark.parametrize("extra, message", [(["--cache", "nowhere"], "nowhere"), (["--n", "1"], "--n")])
def test_eval_cli_errors_are_one_line(cache, tmp_path, fake_sampler, extra, message):
    args = ["eval", "--checkpoint", "c.pt", "--cache", str(cache), "--out", str(tmp_path / "o"), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output


class FakeInception(torch.nn.Module):
    """Stands in for clean-fid's TorchScript Inception (same file name, a `layers` submodule, 2048-d)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048)
        )

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_inception_fid_is_used_when_its_weights_are_on_disk(cache, tmp_path, probe, monkeypatch):
    weights = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(FakeInception()).save(str(weights))
    monkeypatch.setattr(eval_features, "CLEANFID_INCEPTION", weights)  # clean-fid's download location
    result = run(cache, tmp_path, "inception", noise, probe, n=12, grid=0, rerank=2)  # resize is slow
    assert result["fid_features"] == "inception" and result["fid"] == result["fid_inception"]
    assert result["fid_clip"] is not None and result["fid"] != result["fid_clip"]
    block = result["rerank"]  # the re-ranked FID follows the plain one's features
    assert block["fid"] == block["fid_inception"] is not None and block["fid"] != block["fid_clip"]


# ---------------------------------------------------------------------------------------------------------
# References beside every number, and unreadable user files
# ---------------------------------------------------------------------------------------------------------


def test_every_metric_has_its_reference_beside_it(results, tmp_path_factory):
    out = tmp_path_factory.getbasetemp()
    written = json.loads(next(out.glob("evals*/oracle/eval.json")).read_text())
    for metric in ("fid", "fid_clip", "clip_score"):  # named after the metric: beside it in the sorted file
        assert written[f"{metric}_real"] is not None, metric
    for split in ("", "_held_out_pairs", "_seen_pairs"):
        assert set(written[f"attribute_accuracy{split}_chance"]) == {*evaluate_module.ATTRIBUTES, "all"}
    assert written["fid_inception"] is None and written["fid_inception_real"] is None
    assert written["fid_real"] == written["fid_clip_real"] and written["n_real_halves"] == [20, 20]
    assert 0 <= written["fid_real"] < results["noise"]["fid"]
    chance = written["attribute_accuracy_chance"]
    assert chance["shape"] == pytest.approx(1 / 6, abs=1e-3) and chance["size"] == pytest.approx(
        0.5, abs=1e-3
    )
    assert 0.2 <= chance["position"] <= 0.4 and chance["all"] < chance["shape"]
    assert written["attribute_accuracy_chance"] == results["noise"]["attribute_accuracy_chance"]  # prompts
    line = evaluate_module.describe(written)
    assert "FID (CLIP features) " in line and "real halves" in line and "chance" in line, line
    assert f"CLIP score {written['clip_score']} (real {written['clip_score_real']})" in line, line


def test_compare_reads_chance_levels_from_eval_json(results):
    from trainers.compare.report import chance_levels

    chance, source = chance_levels(results["oracle"])
    assert source.startswith("eval.json")
    assert chance["acc"] == results["oracle"]["attribute_accuracy_chance"]
    assert chance["acc_held_out"] == results["oracle"]["attribute_accuracy_held_out_pairs_chance"]


def test_eval_cli_unreadable_files_are_one_line(cache, tmp_path, probe):
    bad = bad_torch_files(tmp_path / "bad")
    jpeg, _ = bad["jpeg"]
    good_probe = save_probe(probe, tmp_path / "probe.pt")
    state_dict = tmp_path / "inception-2015-12-05.pt"  # the right name, the wrong kind of file
    torch.save({"w": torch.zeros(2)}, state_dict)
    base = ["eval", "--cache", str(cache), "--out", str(tmp_path / "o"), "--n", "4", "--device", "cpu"]
    for extra, message in (
        (["--checkpoint", str(jpeg)], f"--checkpoint {jpeg}: a JPEG image"),
        (["--checkpoint", str(bad["truncated"][0])], "truncated"),
        (["--checkpoint", "CKPT", "--probe", str(jpeg)], f"--probe {jpeg}: a JPEG image"),
        (["--checkpoint", "CKPT", "--probe", str(good_probe), "--inception", str(jpeg)], "--inception"),
        (["--checkpoint", "CKPT", "--probe", str(good_probe), "--inception", str(state_dict)], "TorchScript"),
        (["--checkpoint", "CKPT", "--prompts", str(jpeg)], f"--prompts {jpeg}"),
    ):
        uses_fake = "CKPT" in extra
        with pytest.MonkeyPatch.context() as patch:
            if uses_fake:
                patch.setitem(sys.modules, "trainers.families.load", _fake_sampler_module())
            result = runner.invoke(app, base + [a if a != "CKPT" else "c.pt" for a in extra])
        assert result.exit_code == 2, result.output
        lines = [
            line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")
        ]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output


def test_inception_weights_are_read_from_the_file_given(cache, tmp_path, probe, monkeypatch):
    """--inception names a file; any name works (not only clean-fid's inception-2015-12-05.pt)."""
    weights = tmp_path / "my-inception.pt"
    torch.jit.script(FakeInception()).save(str(weights))
    monkeypatch.setattr(eval_features, "CLEANFID_INCEPTION", tmp_path / "absent.pt")
    result = run(cache, tmp_path, "named", noise, probe, n=12, grid=0, inception=weights)
    assert result["fid_features"] == "inception" and result["fid_real"] == result["fid_inception_real"]
    assert "FID (Inception features) " in evaluate_module.describe(result)


def _fake_sampler_module():
    module = types.ModuleType("trainers.families.load")
    module.load_generator = lambda ckpt_path, **kwargs: (noise, dict(INFO))
    return module


# ---------------------------------------------------------------------------------------------------------
# Re-ranking: its own block beside the unchanged plain metrics
# ---------------------------------------------------------------------------------------------------------


def test_rerank_block_beside_the_plain_metrics(cache, tmp_path, probe):
    plain = run(cache, tmp_path, "plain", noise, probe, n=16, batch_size=8)
    ranked = run(cache, tmp_path, "ranked", noise, probe, n=16, batch_size=8, rerank=3)
    assert "rerank" not in plain and "rerank" not in plain["seconds"] and "rerank" in ranked["seconds"]
    differ = {"checkpoint", "grid", "seconds", "rerank"}  # names, paths, timings
    assert {k: v for k, v in ranked.items() if k not in differ} == {
        k: v for k, v in plain.items() if k not in differ
    }
    block = ranked["rerank"]
    assert block["candidates"] == 3 and block["fid"] == block["fid_clip"] != ranked["fid"]
    assert block["clip_score"] > ranked["clip_score"] and block["clip_score"] > block["clip_score_candidates"]
    assert 0 < block["kept_first"] < 1  # noise: the plain draw wins about a third of the time
    for split in ("", "_held_out_pairs", "_seen_pairs"):
        assert set(block[f"attribute_accuracy{split}"]) >= {*evaluate_module.ATTRIBUTES, "all"}, split
    with Image.open(block["grid"]["file"]) as grid:
        assert grid.size == Image.open(ranked["grid"]["file"]).size
    line = evaluate_module.describe(ranked)
    assert f"best of 3 by CLIP: FID {block['fid']}, CLIP score {block['clip_score']}" in line, line
    with pytest.raises(ConfigError, match="--rerank must be at least 1"):
        EvalConfig("x", cache, tmp_path / "c", rerank=0).validate()


# ---------------------------------------------------------------------------------------------------------
# A cache without synthetic-world labels (a user's own images): no attribute numbers, honest prompts
# ---------------------------------------------------------------------------------------------------------

PHOTO_CAPTIONS = ("a dog on a sofa", "a bowl of soup", "two bikes by a wall", "a rainy street")


def _embed_folder(folder, cache):
    config = EmbedConfig(
        inputs=(str(folder),), cache=cache, clip_model=TINY_CLIP, clip_pretrained="", image_size=32, workers=0
    )
    run_embed(config)
    return cache


@pytest.fixture(scope="module")
def photo_caches(tmp_path_factory):
    """Two image-folder caches without .json labels: one with a .txt caption beside most images, one
    without any caption."""
    caches = {}
    for name, captioned in (("captioned", True), ("bare", False)):
        folder = tmp_path_factory.mktemp(f"photos-{name}")
        for i in range(24):
            (folder / f"p{i:02d}.jpg").write_bytes(image_bytes((10 * i, 255 - 9 * i, 90), size=(40, 32)))
            if captioned and i % 6:
                (folder / f"p{i:02d}.txt").write_text(PHOTO_CAPTIONS[i % 4] + "\n")
        caches[name] = _embed_folder(folder, tmp_path_factory.mktemp(f"cache-{name}"))
    return caches


ATTRIBUTE_KEYS = tuple(
    f"attribute_accuracy{split}{ref}"
    for split in ("", "_held_out_pairs", "_seen_pairs")
    for ref in ("", "_chance")
) + ("attribute_accuracy_real", "probe")


def test_unlabelled_cache_measures_no_attributes_and_prompts_are_its_captions(photo_caches, tmp_path, probe):
    result = run(photo_caches["captioned"], tmp_path, "photos", noise, probe, n=16, rerank=2)
    assert {k: result[k] for k in ATTRIBUTE_KEYS} == dict.fromkeys(ATTRIBUTE_KEYS)  # the probe given: unused
    assert all(
        result["rerank"][f"attribute_accuracy{s}"] is None for s in ("", "_held_out_pairs", "_seen_pairs")
    )
    assert result["attributes"] == {
        "measured": False,
        "why_not": "the cache's images have no synthetic-world labels",
        "labelled_images": 0,
        "sampled_images": 24,
    }
    prompts = result["prompts"]
    assert prompts["source"] == "the cache's captions (seed 0, 4 distinct)" and prompts["unique"] == 4
    assert prompts["max_objects"] is None and prompts["naming_held_out_pairs"] is None
    assert prompts["by_objects"] is None
    grid_prompts = (tmp_path / "photos" / "grid_prompts.txt").read_text().splitlines()
    assert set(grid_prompts) == set(PHOTO_CAPTIONS)
    line = evaluate_module.describe(result)
    plain = line.split("; best of")[0]
    assert plain.endswith(", attributes: not measured (the cache's images have no synthetic-world labels)")
    assert "chance" not in line, line


def test_unlabelled_cache_without_captions_says_its_prompts_are_placeholders(photo_caches, tmp_path, probe):
    result = run(photo_caches["bare"], tmp_path, "bare", noise, probe, n=8, grid=0)
    assert result["prompts"]["source"].startswith("synthetic (seed 0, 1-2 objects): placeholders")
    assert "as the cache's images" not in result["prompts"]["source"]
    assert result["attribute_accuracy"] is None and result["probe"] is None
    # Prompts in the world's grammar from a file: still nothing for the probe to be right about here.
    prompts = tmp_path / "world_prompts.txt"
    prompts.write_text("a red star on the left\na small blue circle at the top\n")
    given = run(photo_caches["bare"], tmp_path, "given", noise, probe, n=8, grid=0, prompts=prompts)
    assert given["attribute_accuracy"] is None and given["attributes"]["measured"] is False
    assert given["prompts"]["source"] == str(prompts)


def test_eval_cli_on_unlabelled_cache_trains_no_probe_and_says_so(photo_caches, tmp_path, fake_sampler):
    cache, out = photo_caches["captioned"], tmp_path / "out"
    args = ["eval", "--checkpoint", "c.pt", "--cache", str(cache), "--out", str(out), "--n", "12"]
    result = runner.invoke(app, args + ["--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert not list(cache.glob("_trainers/probe-*.pt"))  # no probe was trained for it
    line = next(line for line in result.output.splitlines() if line.startswith("eval: n="))
    assert "attributes: not measured (the cache's images have no synthetic-world labels)" in line, line
    assert "FID (CLIP features) " in line and " over 12 real images (real halves " in line, line
    written = json.loads((out / "eval.json").read_text())
    assert written["attributes"]["why_not"] and written["attribute_accuracy"] is None


def test_labelled_cache_is_measured_and_records_why_not_for_free_prompts(results, cache, tmp_path, probe):
    assert results["oracle"]["attributes"] == {
        "measured": True,
        "why_not": None,
        "labelled_images": 40,
        "sampled_images": 40,
    }
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n")
    free = run(cache, tmp_path, "free", noise, probe, prompts=prompts, n=8, grid=0)
    assert free["attributes"]["why_not"] == "no prompt names a synthetic-world object"
    assert "attributes: not measured (no prompt names a synthetic-world object)" in evaluate_module.describe(
        free
    )


def test_fid_line_says_how_many_real_images_when_few(results):
    oracle = dict(results["oracle"])
    assert oracle["n_real"] == 40 and oracle["fid_dim"] == 64  # 40 < 10 x 64
    assert (
        f"FID (CLIP features) {oracle['fid']} over 40 real images (real halves"
        in evaluate_module.describe(oracle)
    )
    assert any(note.startswith("n_real=40 is small for 64-d features") for note in oracle["notes"])
    oracle["n_real"] = evaluate_module.FID_IMAGES_PER_DIM * 64  # enough: the line stays short
    assert "real images (real halves" not in evaluate_module.describe(oracle)


def test_position_chance_is_k_over_5_per_object_of_a_k_object_prompt(results):
    """One definition: 0.20 on single-object prompts, 1/3 on as many one- as two-object prompts; eval.json
    carries the mix (prompts.by_objects), so its position chance follows from the file."""
    from trainers.probe.prompts import attribute_chance

    one = {"shape": "star", "colour": "red", "size": "small", "position": "left"}
    two = [one, {**one, "position": "right"}]
    assert attribute_chance([[one]] * 10)["position"] == pytest.approx(0.2)
    assert attribute_chance([[one], two] * 5)["position"] == pytest.approx(1 / 3, abs=1e-4)
    written = results["oracle"]
    by_objects = {int(k): v for k, v in written["prompts"]["by_objects"].items()}
    assert sum(by_objects.values()) == N and set(by_objects) == {1, 2}, by_objects
    objects = sum(k * count for k, count in by_objects.items())
    # the partial world's prompts: position chance is averaged over the objects that name a position
    targets = [parse_caption(p) for p in synthetic_prompts(N, 0, 2, partial=True)]
    positions = [len(objs) / 5 for objs in targets for o in objs if "position" in o]
    assert written["attribute_accuracy_chance"]["position"] == pytest.approx(np.mean(positions), abs=1e-4)
    assert written["attribute_accuracy"]["n_objects"] == objects


def test_compare_has_no_chance_levels_for_an_unmeasured_eval(photo_caches, tmp_path, probe):
    from trainers.compare.report import chance_levels

    result = run(photo_caches["captioned"], tmp_path, "photos", noise, probe, n=8, grid=0)
    chance, source = chance_levels(result)
    assert chance == {} and "not measured" in source, (chance, source)
