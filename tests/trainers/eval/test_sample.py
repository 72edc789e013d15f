"""`trainers sample` and `load_generator`: the eval contract, determinism, the grid's size and labels,
single images, and the CLI (success and one-line errors)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bad_torch_files import bad_torch_files
from factories import TINY_CLIP
from PIL import Image
from typer.testing import CliRunner

from cli.trainers import app
from core.errors import ConfigError
from trainers.engine.grid import LABEL_WIDTH, render_grid
from trainers.eval.sample import SampleConfig, run_sample
from trainers.families.gan.config import GanConfig
from trainers.families.gan.model import build_models
from trainers.families.gan.train import DataSource, run_gan
from trainers.families.load import load_generator

H_DIM = 64  # lafite-tiny
RES = 32
runner = CliRunner()


def _source() -> DataSource:
    def batches(start_step: int):
        for step in itertools.count(start_step):
            g = torch.Generator().manual_seed(step)
            yield {
                "image": torch.rand(4, 3, RES, RES, generator=g) * 2 - 1,
                "cond": F.normalize(torch.randn(4, H_DIM, generator=g), dim=1),
                "key": [str(i) for i in range(4)],
                "paired": torch.zeros(4, dtype=torch.bool),
            }

    return DataSource(batches, TINY_CLIP, "", H_DIM)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = GanConfig(
        out=tmp_path_factory.mktemp("runs"),
        size="tiny",
        condition="perturb",
        steps=2,
        batch_size=4,
        device="cpu",
        prompts=("a red circle",),
        samples_per_prompt=1,
    )
    return run_gan(config, _source(), progress=False).checkpoint


def test_load_generator_contract(checkpoint):
    generate, info = load_generator(checkpoint)
    assert info["kind"] == "gan" and info["step"] == 2
    assert info["clip_model"] == TINY_CLIP and info["clip_pretrained"] == ""
    assert info["config"]["size"] == "tiny" and info["resolution"] == RES
    cond = F.normalize(torch.randn(5, H_DIM), dim=1)
    rng_before = torch.get_rng_state()
    images = generate(cond, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # sampling leaves the global RNG alone
    assert images.dtype == torch.uint8 and images.shape == (5, 3, RES, RES)
    assert torch.equal(images, generate(cond, seed=3))  # deterministic for a seed
    assert not torch.equal(images, generate(cond, seed=4))
    assert images.float().std() > 0  # not a constant image
    with pytest.raises(ValueError, match=f"\\[N, {H_DIM}\\]"):
        generate(torch.zeros(2, 7), seed=0)


def test_load_generator_uses_the_ema_weights(checkpoint, tmp_path):
    """Make G and G_ema differ in a copy of the checkpoint: generate must follow G_ema."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["G"] = {
        k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ckpt["G"].items()
    }
    path = tmp_path / "0000002.pt"
    torch.save(ckpt, path)
    generate, _ = load_generator(path)
    cond = F.normalize(torch.randn(3, H_DIM), dim=1)
    for key, expected_equal in (("G_ema", True), ("G", False)):
        G, _ = build_models(ckpt["arch"])
        G.load_state_dict(ckpt[key])
        assert torch.equal(generate(cond, 0), G.eval().sample(cond, 0)) == expected_equal, key


def test_load_generator_refuses_non_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="--checkpoint .*junk.pt: not a torch checkpoint"):
        load_generator(tmp_path / "junk.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(
        ConfigError, match="--checkpoint .*tensor.pt: .*not a `trainers gan` or `trainers ldm`"
    ):
        load_generator(tmp_path / "tensor.pt")
    torch.save({"kind": "clip", "step": 1}, tmp_path / "other.pt")  # neither gan nor ldm
    with pytest.raises(ConfigError, match="not a `trainers gan` or `trainers ldm` .*checkpoint .kind 'clip'"):
        load_generator(tmp_path / "other.pt")


def test_sample_writes_grid_and_single_images(checkpoint, tmp_path):
    out = tmp_path / "sub" / "grid.png"
    prompts = ("a red circle", "a small blue square on the left", "a green star at the top")
    result = run_sample(SampleConfig(checkpoint=checkpoint.parent, prompts=prompts, out=out, n=3, seed=1))
    with Image.open(out) as grid:
        assert grid.size == (LABEL_WIDTH + 3 * RES, 3 * RES)
        pixels = torch.from_numpy(np.array(grid.convert("RGB")))
    singles = sorted((tmp_path / "sub" / "grid").glob("*.png"))
    assert [p.name for p in singles] == [f"{r:03d}-{c:03d}.png" for r in range(3) for c in range(3)]
    assert result.images == singles and result.step == 2
    with Image.open(singles[5]) as single:  # row 1, column 2
        assert single.size == (RES, RES)
        cell = pixels[RES : 2 * RES, LABEL_WIDTH + 2 * RES : LABEL_WIDTH + 3 * RES]
        assert torch.equal(torch.from_numpy(np.array(single)), cell)


def test_grid_draws_each_label_in_its_row():
    images = torch.full((2, 3, RES, RES), 128, dtype=torch.uint8)
    grid = torch.from_numpy(np.array(render_grid(images, ["first", ""], 1)))
    label_rows = grid[:, :LABEL_WIDTH].float().mean(dim=(1, 2))  # [H] mean brightness of the label area
    assert label_rows[:RES].min() < 250  # dark text pixels in row 0
    assert label_rows[RES:].min() == 255  # an empty prompt draws nothing
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        render_grid(images[:1].repeat(3, 1, 1, 1), ["a", "b"], 1)


def test_cli_sample(checkpoint, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# a comment\na purple diamond\n\n")
    out = tmp_path / "s.png"
    args = [
        "sample",
        "--checkpoint",
        str(checkpoint),
        "--prompt",
        "a red circle",
        "--prompts",
        str(prompts_file),
        "--n",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sample: 4 images at 32px from step 2" in result.output
    with Image.open(out) as grid:
        assert grid.size == (LABEL_WIDTH + 2 * RES, 2 * RES)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "missing.pt", "--prompt", "x"], "--checkpoint missing.pt"),
        (["--checkpoint", "CKPT"], "give at least one --prompt"),
        (["--checkpoint", "CKPT", "--prompt", "x", "--out", "grid.jpg"], "--out grid.jpg"),
        (["--checkpoint", "CKPT", "--prompt", "x", "--n", "0"], "--n must be at least 1"),
    ],
)
def test_cli_sample_errors_are_one_line(checkpoint, args, message):
    args = [str(checkpoint) if a == "CKPT" else a for a in args]
    result = runner.invoke(app, ["sample", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0], result.output


@pytest.mark.parametrize("name", ["jpeg", "truncated", "numpy_inside", "html"])
def test_cli_sample_unreadable_checkpoint_is_one_line(tmp_path, name):
    path, message = bad_torch_files(tmp_path)[name]
    result = runner.invoke(app, ["sample", "--checkpoint", str(path), "--prompt", "x"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and f"--checkpoint {path}: " in lines[0], result.output
    assert re.search(message, lines[0]), lines[0]


def test_cli_sample_unreadable_prompts_file_is_one_line(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xd8\xff\xe0 not text")
    result = runner.invoke(app, ["sample", "--checkpoint", str(checkpoint), "--prompts", str(prompts)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and f"--prompts {prompts}: " in lines[0], result.output
