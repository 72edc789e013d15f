"""`trainers vae`: shapes, the loss terms, a few steps lowering the reconstruction loss, the held-out PSNR
and the CLI (success and one-line errors)."""

from __future__ import annotations

import json

import pytest
import torch
from factories import TINY_CLIP, tiny_cache
from typer.testing import CliRunner

from cli.trainers import app
from core.clip import load_clip
from core.errors import ConfigError
from trainers.autoencoders.pixels import psnr
from trainers.autoencoders.vae.config import VaeConfig
from trainers.autoencoders.vae.model import (
    VAE_SIZES,
    AutoencoderKL,
    ClipPerceptual,
    PatchDiscriminator,
    kl_loss,
    load_vae,
    vae_architecture,
)
from trainers.autoencoders.vae.train import VaeTrainer

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("vae-cache"))


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(TINY_CLIP, None, "cpu")


@pytest.mark.parametrize("size", list(VAE_SIZES))
def test_encode_decode_shapes(size):
    model = AutoencoderKL(vae_architecture(size, 32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    assert model.decode(mean).shape == (2, 3, 32, 32)
    with pytest.raises(ConfigError, match="multiple of 4"):
        vae_architecture(size, 30)


def test_kl_and_psnr():
    zeros = torch.zeros(2, 4, 8, 8)
    assert float(kl_loss(zeros, zeros, 100)) == 0.0  # N(0, I) posterior: no KL
    assert float(kl_loss(zeros + 1, zeros, 100)) == pytest.approx(0.5 * 256 / 100)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert float(psnr(x + 0.2, x).max()) < 30 < float(psnr(x + 0.002, x).min())


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_perceptual_term_is_zero_for_equal_images_and_has_gradients(tiny_clip, tower):
    clip = tiny_clip if tower == "vit" else load_clip("lafite-rn32", None, "cpu")
    perceptual = ClipPerceptual(clip)
    assert len(perceptual.blocks) == (4 if tower == "resnet" else 2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(perceptual(x, x)) < 1e-10
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    loss = perceptual(y, x)
    loss.backward()
    assert float(loss.detach()) > 0 and y.grad is not None and float(y.grad.abs().sum()) > 0


@pytest.mark.parametrize("recon_loss", ["l1", "mse"])
def test_a_few_steps_reduce_the_reconstruction_loss(tiny_clip, recon_loss):
    torch.manual_seed(0)
    config = VaeConfig(size="tiny", lr=3e-3, batch_size=4, cache=None, recon_loss=recon_loss)
    trainer = VaeTrainer(config, vae_architecture("tiny", 32), tiny_clip, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(4, 3, 32, 32, generator=g) > 0.5).float() * 2 - 1  # [4, 3, 32, 32] high contrast

    def recon_l1() -> float:
        with torch.no_grad():
            mean, _ = trainer.model.encode(x)
            error = trainer.model.decode(mean) - x
            return float(error.abs().mean() if recon_loss == "l1" else error.square().mean())

    before = recon_l1()
    for _ in range(25):
        losses = trainer.train_step({"image": x})
        assert all(torch.isfinite(v) for v in losses.values()) and recon_loss in losses
    assert recon_l1() < 0.8 * before


def test_cli_trains_checkpoints_and_reports_held_out_psnr(cache, tmp_path):
    args = ["vae", "--cache", cache, "--out", tmp_path, "--size", "tiny", "--steps", 2, "--batch-size", 4]
    result = runner.invoke(
        app, [str(a) for a in args + ["--eval-n", 4, "--device", "cpu", "--allow-partial"]]
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "000-vae"
    assert "vae: step 2" in result.output and str(run / "0000002.pt") in result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["n_eval"] == 4 and 0 < report["psnr_db"] < 100
    kept = report["reconstruction"]  # a world cache, but 4 held-out images: too few for the probe
    assert kept["psnr_db"] == report["psnr_db"] and kept["object_erased_psnr_db"] > kept["mean_image_psnr_db"]
    assert kept["probe"] is None and kept["probe_note"].startswith("4 labelled held-out image(s): too few")
    assert "objects erased" in result.output and "attributes not measured (4 labelled" in result.output
    config = json.loads((run / "config.json").read_text())
    data = config["data"]
    assert (data["n_train"], data["n_eval"]) == (12, 4)  # held-out images are not trained on
    assert data["n_images"] == 16 and data["partial"] is False and data["shards"] == {"embed": [0, 1]}
    assert config["allow_partial"] is True
    assert report["training_data"] == data  # eval.json keeps the same record of the rows
    assert data["condition"] is None  # an autoencoder reads images alone: no condition to record
    model, ckpt = load_vae(run)
    assert ckpt["step"] == 2 and ckpt["arch"]["resolution"] == 32 and not model.training


def test_cli_errors_are_one_line(cache, tmp_path):
    def user_error(args, message):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        lines = [x for x in result.output.splitlines() if x.strip() and not x.startswith("warning")]
        assert len(lines) == 1 and message in lines[0], result.output

    user_error(["vae", "--cache", cache, "--out", tmp_path, "--size", "huge"], "--size huge")
    user_error(
        ["vae", "--cache", tmp_path / "nope", "--out", tmp_path, "--size", "tiny"], "no such directory"
    )
    user_error(["vae", "--out", tmp_path], "--cache is required")
    user_error(["vae", "--cache", cache, "--out", tmp_path, "--disc-weight", -1], "--disc-weight")
    user_error(["vae", "--cache", cache, "--out", tmp_path, "--disc-start", -1], "--disc-start")
    user_error(["vae", "--cache", cache, "--out", tmp_path, "--recon-loss", "huber"], "--recon-loss huber")
    assert not list(tmp_path.glob("0*-vae"))


def test_patch_discriminator_gives_a_logit_per_patch():
    disc = PatchDiscriminator(8)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 8, 8)
    assert disc(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 16, 16)


def test_discriminator_starts_after_the_warm_up_and_trains(tiny_clip):
    torch.manual_seed(0)
    config = VaeConfig(size="tiny", batch_size=4, disc_weight=0.1, disc_start=2, perceptual_weight=0.0)
    trainer = VaeTrainer(config, vae_architecture("tiny", 32), tiny_clip, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    disc_before = [p.detach().clone() for p in trainer.disc.parameters()]
    warm_up = [trainer.train_step({"image": x}) for _ in range(2)]
    assert all("g_adv" not in losses and "d_loss" not in losses for losses in warm_up)
    assert all(torch.equal(a, b) for a, b in zip(disc_before, trainer.disc.parameters(), strict=True))
    adversarial = [trainer.train_step({"image": x}) for _ in range(2)]
    for losses in adversarial:
        assert {"g_adv", "d_loss"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
        # the autoencoder's loss includes the weighted generator term
        expected = losses[config.recon_loss] + config.kl_weight * losses["kl"]
        expected = expected + config.disc_weight * losses["g_adv"]
        torch.testing.assert_close(losses["loss"], expected)
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, trainer.disc.parameters(), strict=True))
    assert all(p.requires_grad for p in trainer.disc.parameters())
    assert {"model", "opt", "disc", "disc_opt"} == set(trainer.state_dict())


def test_no_discriminator_by_default(tiny_clip):
    trainer = VaeTrainer(VaeConfig(size="tiny"), vae_architecture("tiny", 32), tiny_clip, torch.device("cpu"))
    assert trainer.disc is None and set(trainer.state_dict()) == {"model", "opt"}


def test_cli_trains_with_the_discriminator(cache, tmp_path):
    args = ["vae", "--cache", cache, "--out", tmp_path, "--size", "tiny", "--steps", 3, "--batch-size", 4]
    args += ["--eval-n", 4, "--device", "cpu", "--disc-weight", 0.5, "--disc-start", 1]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    run = tmp_path / "000-vae"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "d_loss" in lines[-1] and "g_adv" in lines[-1]
    ckpt = torch.load(run / "0000003.pt", weights_only=True)
    assert "disc" in ckpt and "disc_opt" in ckpt and ckpt["config"]["disc_weight"] == 0.5
    model, _ = load_vae(run)  # the discriminator is not part of what `trainers ldm` loads
    assert not model.training
