"""`trainers clip`: the loss falls, the checkpoint is what `pipeline embed` loads, the eval is written."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.trainers import app
from core.clip import encode_images, encode_texts, load_clip
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import run_embed
from trainers.clip.config import ClipTrainConfig
from trainers.clip.data import PRETRAIN_INDEX, batch_rows, contrast_group, render_pairs, step_captions
from trainers.clip.train import train_clip
from trainers.clip.zero_shot import HELD_OUT_INDEX, held_out_images, modality_gap
from world import grammar
from world.grammar import ATTRIBUTES, parse_caption
from world.synth import SynthConfig, run_synth

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    run_synth(SynthConfig(out=out, n=64, shard_size=32, n_captions=40, image_size=32))
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    config = ClipTrainConfig(
        data=(str(world / "*.tar"),),
        out=tmp_path_factory.mktemp("run"),
        size="tiny",
        steps=40,
        batch_size=32,
        warmup=5,
        eval_n=60,
        device="cpu",
    )
    return train_clip(config)


def test_training_lowers_the_contrastive_loss(trained):
    first, last = np.mean(trained.losses[:5]), np.mean(trained.losses[-5:])
    assert last < first - 0.5 and last < math.log(32) - 0.3, trained.losses  # below chance for B = 32


def test_checkpoint_loads_through_pipeline_clip_and_matches_the_trained_model(trained):
    pixels, labels = held_out_images(8, seed=3, image_size=32)
    captions = [lab["caption"] for lab in labels]
    state = torch.load(trained.checkpoint, weights_only=True)
    assert set(state) == {"state_dict"}
    for clip_model in ("lafite-tiny", str(trained.model_config)):
        bundle = load_clip(clip_model, str(trained.checkpoint), "cpu")
        in_memory = dataclasses.replace(bundle, model=trained.model)
        assert bundle.identity["weights"].startswith("file:")
        torch.testing.assert_close(encode_images(bundle, pixels), encode_images(in_memory, pixels))
        torch.testing.assert_close(encode_texts(bundle, captions), encode_texts(in_memory, captions))
    random_init = load_clip("lafite-tiny", None, "cpu")  # the check above can fail: weights matter
    assert not torch.allclose(encode_images(random_init, pixels), encode_images(bundle, pixels), atol=1e-3)


def test_pipeline_embed_uses_the_trained_clip(trained, world, tmp_path):
    cache = tmp_path / "cache"
    config = EmbedConfig(
        inputs=(str(world / "00000.tar"),),
        cache=cache,
        clip_model="lafite-tiny",
        clip_pretrained=str(trained.checkpoint),
        image_size=32,
        workers=0,
    )
    run_embed(config)
    table = pq.read_table(cache / "embed" / "00000.parquet")
    stored = torch.tensor(np.stack(table["img_emb"].to_numpy(zero_copy_only=False)).astype(np.float32))
    from feature_cache.embed_rows import read_embed

    rows = read_embed(cache)
    bundle = dataclasses.replace(
        load_clip("lafite-tiny", str(trained.checkpoint), "cpu"), model=trained.model
    )
    torch.testing.assert_close(
        stored, encode_images(bundle, rows.pixels(range(len(rows)))), atol=2e-3, rtol=0
    )


def test_clip_eval_json_has_zero_shot_accuracy_per_attribute(trained):
    evaluation = json.loads(trained.eval_path.read_text())
    assert set(evaluation["zero_shot"]) == set(ATTRIBUTES) == set(evaluation["chance"])
    for attribute in ATTRIBUTES:
        assert 0.0 <= evaluation["zero_shot"][attribute] <= 1.0
        assert 0.0 <= evaluation["zero_shot_single_prompt"][attribute] <= 1.0
    assert evaluation["eval_images"]["first_index"] >= 10**9  # never an image any synth run wrote
    assert evaluation["pairs"] == 64 and evaluation["loss_last"] < evaluation["loss_first"]
    assert json.loads((trained.run_dir / "clip_config.json").read_text())["embed_dim"] == 64


def test_a_damaged_clip_eval_json_is_one_line_naming_it_and_the_fix(tmp_path):
    from manifests.errors import Unreadable
    from trainers.clip.train import read_eval

    (tmp_path / "clip_eval.json").write_bytes(b'{"zero_shot": {"shape": 0.\xff')
    with pytest.raises(Unreadable, match="clip_eval.json: not valid JSON .*--force") as info:
        read_eval(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_clip_cli_trains_and_refuses_to_overwrite(world, tmp_path):
    run = tmp_path / "run"
    shards = sorted(str(p) for p in world.glob("*.tar"))
    args = [
        "clip",
        "--data",
        *shards,
        "--out",
        str(run),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--eval-n",
        "12",
    ]
    result = runner.invoke(app, args + ["--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "clip: 2 steps on 64 pairs" in result.output
    assert all(
        (run / name).is_file() for name in ("clip.pt", "clip_config.json", "clip_eval.json", "config.json")
    )
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "nowhere/*.tar"], "nowhere"),
        (["--data", "WORLD", "--size", "huge"], "--size"),
        (["--data", "WORLD", "--steps", "0"], "--steps"),
        (["--contrast-group", "7"], "--contrast-group"),
        (["--max-objects", "3"], "--max-objects"),
        (["--pretrain-n", "1"], "--pretrain-n"),
        (["--temperature", "warm"], "--temperature must be a number or `learnt`"),
        (["--temperature", "0.001"], "--temperature must be between 0.01 and 10"),
        (["--caption-style", "some"], "--caption-style"),
        (["--temperature", "learnt", "--temperature-start", "0.1"], "--temperature-start anneals a fixed"),
        (["--temperature-start", "20"], "--temperature-start must be between 0.01 and 10"),
    ],
)
def test_clip_cli_errors_are_one_line(world, tmp_path, extra, message):
    extra = [str(world / "00000.tar") if a == "WORLD" else a for a in extra]
    result = runner.invoke(app, ["clip", "--out", str(tmp_path / "run"), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output


def test_contrast_groups_differ_only_in_the_first_objects_shape():
    for index in range(PRETRAIN_INDEX, PRETRAIN_INDEX + 12):
        pairs = contrast_group(seed=0, index=index, group=3, image_size=32, max_objects=2)
        objects = [parse_caption(caption) for _, caption, _, _ in pairs]
        assert len({tuple(o[0].items()) for o in objects}) == 3  # three different first objects...
        assert len({o[0]["shape"] for o in objects}) == 3  # ...by shape
        for other in objects[1:]:
            assert [{k: v for k, v in o.items() if k != "shape"} for o in other[:1]] == [
                {k: v for k, v in objects[0][0].items() if k != "shape"}
            ]
            assert other[1:] == objects[0][1:]  # the second object, if any, is the same
        images = [image for image, _, _, _ in pairs]
        assert all(image.shape == (3, 32, 32) for image in images)
        assert not torch.equal(images[0], images[1])


def test_the_pretraining_stream_is_disjoint_from_worlds_and_eval_images():
    assert PRETRAIN_INDEX >= 2 * HELD_OUT_INDEX  # eval images use [10^9, 2 * 10^9), worlds < 10^9
    pairs = render_pairs(10, seed=0, image_size=32, group=3, max_objects=1)
    assert len(pairs.captions) == 12 and pairs.group == 3  # whole groups, rounded up
    rows = batch_rows(pairs, batch=7, generator=torch.Generator().manual_seed(0))
    assert len(rows) == 6 and all(int(rows[i]) // 3 == int(rows[i + 1]) // 3 for i in (0, 1, 3, 4))


def test_the_stream_recipe_at_test_size_lowers_the_loss_and_beats_chance_on_colour(tmp_path):
    config = ClipTrainConfig(
        out=tmp_path / "run", size="rn32", steps=300, batch_size=66, pretrain_n=990, warmup=20, eval_n=120,
        device="cpu",
    )  # fmt: skip
    result = train_clip(config)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < first - 0.5, result.losses
    ev = result.evaluation
    assert ev["zero_shot"]["colour"] > ev["chance"]["colour"] + 0.25, ev["zero_shot"]
    assert ev["zero_shot_prompts"] == "the attribute alone"  # the partial world's recipe, by default
    assert ev["training_data"]["first_index"] == PRETRAIN_INDEX
    assert ev["training_data"]["caption_style"] == "partial"
    gap = ev["modality_gap"]  # computed and recorded beside zero-shot
    assert gap["captions_per_image"] == 5 and gap["images"] == 120
    assert -1 <= gap["cos_image_other_caption"] < gap["cos_image_own_caption"] <= 1, gap
    assert 0 < gap["gap_vector_length"] <= 2
    assert json.loads((tmp_path / "run" / "clip_eval.json").read_text())["modality_gap"] == gap
    slots = ev["zero_shot_two_objects"]
    assert slots["n_images"] > 20 and set(slots["object_1"]) == set(ATTRIBUTES)


def test_a_stopped_run_resumes_to_the_weights_of_a_run_never_stopped(world, tmp_path, capsys):
    """Checkpointed every 2 steps and stopped (Ctrl-C) in step 4: --resume redoes steps 3-4 from the state
    saved after step 2, and ends with every weight equal to the run that was never stopped."""
    base = dict(data=(str(world / "*.tar"),), size="tiny", steps=5, batch_size=16, warmup=1, eval_n=0)
    base.update(device="cpu", checkpoint_every=2)
    straight = train_clip(ClipTrainConfig(out=tmp_path / "straight", **base))
    assert not (tmp_path / "straight" / "train_state.pt").exists()  # removed once clip.pt is written

    def stop_in_step_4(n, steps=[]):  # noqa: B006 - counts the calls
        steps.append(n)
        if len(steps) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_clip(ClipTrainConfig(out=tmp_path / "stopped", **base), stop_in_step_4)
    saved = torch.load(tmp_path / "stopped" / "train_state.pt", weights_only=True)
    assert saved["step"] == 4 and not (tmp_path / "stopped" / "clip.pt").exists()
    said = f"interrupted: the last checkpoint is {tmp_path / 'stopped' / 'train_state.pt'} (step 4)"
    assert capsys.readouterr().err.splitlines() == [
        said
    ]  # as every trainer says it (trainers.engine.loop.launch)

    advanced = []
    resumed = train_clip(ClipTrainConfig(out=tmp_path / "stopped", resume=True, **base), advanced.append)
    assert advanced == [4, 1]  # the bar continues from the saved step
    assert resumed.losses == pytest.approx(straight.losses, abs=0, rel=0)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_resuming_with_other_learnt_settings_is_one_line(world, tmp_path):
    base = dict(data=(str(world / "*.tar"),), size="tiny", batch_size=16, eval_n=0, device="cpu")
    args = ["clip", "--data", str(world / "*.tar"), "--size", "tiny", "--batch-size", "16"]
    args += ["--eval-n", "0", "--device", "cpu", "--out", str(tmp_path), "--checkpoint-every", "1"]
    with pytest.raises(KeyboardInterrupt):
        train_clip(
            ClipTrainConfig(out=tmp_path, steps=3, checkpoint_every=1, **base),
            lambda n: (_ for _ in ()).throw(KeyboardInterrupt),
        )
    result = runner.invoke(app, [*args, "--steps", "4", "--resume"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: --resume: {tmp_path / 'train_state.pt'} was trained with steps 3 (now 4); give the same "
        "options, or --force without --resume to start over"
    )
    result = runner.invoke(app, [*args, "--steps", "3", "--resume"])
    assert result.exit_code == 0, result.output


def test_step_captions_are_redrawn_each_step_and_name_true_subsets():
    pairs = render_pairs(30, seed=0, image_size=32, group=3, max_objects=2)
    rows = torch.arange(len(pairs.captions))
    first, again, later = (step_captions(pairs, rows, seed=0, step=s) for s in (5, 5, 6))
    assert first == again  # a pure function of (seed, step, row): resumed and data-parallel runs agree
    assert first != later  # re-drawn at the next step
    for row, caption in enumerate(first):
        stated, truth = parse_caption(caption), pairs.objects[row]
        assert len(stated) == len(truth) and all(stated), caption
        named_truth = [{a: t[a] for a in s} for s, t in zip(stated, truth, strict=True)]
        assert grammar.objects_match(stated, named_truth), caption  # true values, caption order
    for g in range(0, len(first), 3):  # a group: one subset and wording, its first object's shape named
        group = [parse_caption(c) for c in first[g : g + 3]]
        assert len({tuple(sorted(o[0])) for o in group}) == 1 and "shape" in group[0][0]
        assert len({o[0]["shape"] for o in group}) == 3


class ConstantClip:
    """encode_image gives e0 for every image, encode_text gives (e0 + e1) / sqrt 2 for every caption."""

    def encode_image(self, x, normalize=True):
        return torch.eye(4)[0].expand(len(x), 4)

    def encode_text(self, tokens, normalize=True):
        return ((torch.eye(4)[0] + torch.eye(4)[1]) / math.sqrt(2)).expand(len(tokens), 4)


def test_modality_gap_figures_on_known_features():
    gap = modality_gap(ConstantClip(), lambda texts: torch.zeros(len(texts), 3), (0.5,) * 3, (0.5,) * 3,
                       32, n=6, seed=0, device="cpu", caption_style="partial")  # fmt: skip
    half = round(1 / math.sqrt(2), 4)
    assert gap["cos_image_own_caption"] == gap["cos_image_other_caption"] == half
    assert gap["cos_text_same_image"] == gap["cos_text_other_image"] == gap["cos_image_image"] == 1.0
    assert gap["gap_vector_length"] == pytest.approx(math.sqrt((1 - half) ** 2 + half**2), abs=1e-3)
    assert gap["captions_per_image"] == 5


def test_temperature_is_fixed_or_learnt(tmp_path):
    from trainers.clip.config import parse_temperature

    assert parse_temperature("learnt") is None and parse_temperature("0.05") == 0.05
    config = ClipTrainConfig(out=tmp_path / "run", size="tiny", steps=3, batch_size=6, pretrain_n=12,
                             eval_n=0, device="cpu", temperature=0.05)  # fmt: skip
    result = train_clip(config)
    assert result.evaluation["logit_scale"] == pytest.approx(20.0, rel=1e-4)  # 1 / 0.05, not learnt
    learnt = train_clip(
        dataclasses.replace(config, out=tmp_path / "learnt", temperature=None, temperature_start=None)
    )
    assert learnt.evaluation["temperature"] is None
    assert learnt.evaluation["logit_scale"] != pytest.approx(1 / 0.07, rel=1e-6)  # it moved


def test_the_default_warm_start_is_dropped_for_a_learnt_temperature_and_kept_for_a_fixed_one(tmp_path):
    base = "clip --size tiny --steps 2 --batch-size 6 --pretrain-n 12 --eval-n 0 --device cpu".split()
    for name, extra, start in (
        ("fixed", [], ClipTrainConfig().temperature_start),
        ("learnt", ["--temperature", "learnt"], None),
    ):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        assert (
            json.loads((tmp_path / name / "config.json").read_text())["config"]["temperature_start"] == start
        )
    assert ClipTrainConfig().temperature_start is not None  # the default anneals


def test_temperature_start_anneals_to_the_fixed_temperature_over_the_first_half(tmp_path):
    config = ClipTrainConfig(out=tmp_path / "run", size="tiny", steps=8, batch_size=6, pretrain_n=12,
                             eval_n=0, device="cpu", temperature=0.02, temperature_start=0.08)  # fmt: skip
    schedule = [config.temperature_at(step) for step in range(8)]
    assert schedule[0] == pytest.approx(0.08) and schedule[2] == pytest.approx(0.04)  # geometric: halfway
    assert schedule[4:] == [pytest.approx(0.02)] * 4  # then the fixed temperature
    assert config.learnt()["temperature_start"] == 0.08  # keyed: another schedule learns otherwise
    # unset, it is not recorded, so a CLIP trained before the option is still reused
    assert "temperature_start" not in dataclasses.replace(config, temperature_start=None).learnt()
    result = train_clip(config)
    assert result.evaluation["logit_scale"] == pytest.approx(50.0, rel=1e-4)  # ends at 1 / 0.02
    assert result.evaluation["temperature_start"] == 0.08


def test_caption_tokens_equal_the_tokenizers_and_tokenize_each_caption_once():
    import open_clip
    import torch

    from trainers.clip.train import CaptionTokens

    tokenizer, calls = open_clip.get_tokenizer("RN50"), []
    cached = CaptionTokens(lambda texts: calls.append(list(texts)) or tokenizer(texts))
    captions = ["a red circle", "a blue square on the left", "a red circle"]
    assert torch.equal(cached(captions), tokenizer(captions))
    assert torch.equal(cached(captions[::-1]), tokenizer(captions[::-1]))
    assert calls == [["a red circle", "a blue square on the left"]]  # each new caption once, then remembered
