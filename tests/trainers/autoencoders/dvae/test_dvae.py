"""`trainers dvae`: shapes and hard codes, the KL and usage figures, the two schedules, a short training
that lowers the loss and beats the mean image on held-out renders, bit-for-bit resume, and the CLI
(training, --encode and its rerun, one-line errors)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from factories import tiny_cache
from typer.testing import CliRunner

from cli.trainers import app
from core.errors import ConfigError
from trainers.autoencoders.dvae.config import DvaeConfig
from trainers.autoencoders.dvae.model import (
    DVAE_SIZES,
    DiscreteVAE,
    codebook_usage,
    decode_tokens,
    dvae_architecture,
    fsq_points,
    fsq_quantize,
    kl_to_uniform,
    load_dvae,
)
from trainers.autoencoders.dvae.train import DvaeTrainer, resolve_config, run_dvae

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_torch_thread):
    return tiny_cache(tmp_path_factory.mktemp("dvae-cache"))


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """A tiny dVAE after 250 steps (about 5 s on one CPU thread), temperature annealed by step 170. Its
    held-out PSNR beat the mean image's by 7.2-9.6 dB over seeds 0-3 (150 steps: 1.1-9.1 dB, too close)."""
    config = DvaeConfig(
        cache=cache, out=tmp_path_factory.mktemp("dvae-runs"), size="tiny", steps=250, batch_size=8, lr=3e-3,
        eval_n=4, anneal_steps=170, kl_warmup=80, checkpoint_every=0, log_every=1, device="cpu",
        quantizer="gumbel",
    )  # fmt: skip
    return run_dvae(config)


def user_error(args, message):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip() and not x.startswith("warning")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_shapes_hard_codes_and_decoding():
    for size, resolution, grid in (("tiny", 32, 8), ("mini", 32, 8), ("small", 64, 16), ("small8", 64, 8)):
        arch = dvae_architecture(size, resolution)
        assert arch["grid"] == [grid, grid] and arch["vocab_size"] == DVAE_SIZES[size].vocab_size
    torch.manual_seed(0)
    model = DiscreteVAE(dvae_architecture("tiny", 32)).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    recon, logits, _ = model(x, temperature=0.5)
    assert recon.shape == (3, 3, 32, 32) and logits.shape == (3, 64, 8, 8)
    codes = model.encode_codes(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert torch.equal(codes, logits.argmax(dim=1))  # hard codes ignore the gumbel noise
    one_hot = torch.nn.functional.one_hot(codes, 64).permute(0, 3, 1, 2).float()  # [3, K, 8, 8]
    with torch.no_grad():
        torch.testing.assert_close(model.decode_codes(codes), model.decode_soft(one_hot))
        want = ((model.decode_codes(codes).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = decode_tokens(model, codes.view(3, 64))
    assert images.dtype == torch.uint8 and torch.equal(images, want)
    assert decode_tokens(model, torch.zeros((0, 64), dtype=torch.long)).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        decode_tokens(model, codes)  # a grid, not token rows
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        decode_tokens(model, torch.full((1, 64), 64))
    with pytest.raises(ConfigError, match="multiple of 4"):
        dvae_architecture("tiny", 30)
    with pytest.raises(ConfigError, match="--size huge"):
        dvae_architecture("huge", 32)


def test_kl_to_uniform_and_codebook_usage():
    assert abs(float(kl_to_uniform(torch.zeros(2, 16, 3, 3)))) < 1e-6  # uniform: no divergence
    peaked = torch.full((1, 16, 2, 2), -1e4)
    peaked[:, 3] = 0.0
    assert float(kl_to_uniform(peaked)) == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=1e-5)
    one = codebook_usage(torch.full((4, 8, 8), 5), 16)
    assert one == {"perplexity": pytest.approx(1.0), "dead_codes": 15}
    every = codebook_usage(torch.arange(32).view(2, 4, 4) % 16, 16)
    assert every == {"perplexity": pytest.approx(16.0), "dead_codes": 0}
    half = codebook_usage(torch.tensor([0, 1, 2, 3] * 5), 8)
    assert half == {"perplexity": pytest.approx(4.0), "dead_codes": 4}


def test_temperature_anneals_and_kl_weight_warms_up():
    config = DvaeConfig(size="tiny", anneal_steps=100, kl_warmup=10, kl_weight=0.5)
    trainer = DvaeTrainer(config, dvae_architecture("tiny", 32), torch.device("cpu"))
    seen = {}
    for step in (0, 5, 10, 50, 100, 1000):
        trainer.step = step
        seen[step] = (trainer.temperature(), trainer.kl_beta())
    assert seen[0] == (1.0, 0.0) and seen[5][1] == pytest.approx(0.25) and seen[10][1] == 0.5
    assert seen[50][0] == pytest.approx(0.25)  # geometric: halfway from 1 to 1/16
    assert seen[100][0] == pytest.approx(1 / 16) and seen[1000] == (pytest.approx(1 / 16), 0.5)
    config = DvaeConfig(size="tiny", kl_warmup=0, kl_weight=0.5)
    no_warmup = DvaeTrainer(config, dvae_architecture("tiny", 32), torch.device("cpu"))
    assert no_warmup.kl_beta() == 0.5


def test_training_lowers_the_loss_and_beats_the_mean_image_on_held_out_images(trained):
    lines = [json.loads(x) for x in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 251))
    first = sum(x["mse"] for x in lines[:10]) / 10
    last = sum(x["mse"] for x in lines[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert lines[-1]["tau"] == pytest.approx(1 / 16) and lines[-1]["kl_beta"] == pytest.approx(0.02)
    report = json.loads((trained.run_dir / "eval.json").read_text())
    assert report["n_eval"] == 4 and report["training_data"]["n_train"] == 12
    assert report["training_data"]["condition"] is None  # a dVAE reads images alone
    # hard-code reconstructions of images never trained on beat the best constant image by dBs
    assert report["psnr_db"] > report["mean_image_psnr_db"] + 2.0, report
    assert 1.0 <= report["perplexity"] <= 64 and report["vocab_size"] == 64
    assert 0 <= report["dead_codes"] < 64 and 64 - report["dead_codes"] >= report["perplexity"] - 1e-6
    assert report["perplexity"] > 1.5  # more than one code in use
    model, ckpt = load_dvae(trained.run_dir)
    assert ckpt["kind"] == "dvae" and ckpt["step"] == 250 and not model.training
    assert ckpt["arch"]["grid"] == [8, 8] and {"model", "opt", "rng", "config", "data"} <= set(ckpt)


@pytest.mark.parametrize("quantizer", ["gumbel", "fsq"])
def test_resume_is_bit_for_bit(cache, tmp_path, quantizer):
    config = DvaeConfig(
        cache=cache, out=tmp_path, size="tiny", steps=4, batch_size=4, eval_n=4, checkpoint_every=2,
        log_every=1, anneal_steps=3, kl_warmup=2, device="cpu", quantizer=quantizer,
    )  # fmt: skip
    run = run_dvae(config).run_dir
    full = torch.load(run / "0000004.pt", weights_only=True)
    cfg, state = resolve_config({}, run / "0000002.pt")
    again = run_dvae(cfg, resume_state=state)
    assert again.run_dir == run and again.step == 4
    resumed = torch.load(run / "0000004.pt", weights_only=True)
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]  # the redone steps are not doubled
    done = run_dvae(resolve_config({}, run)[0])
    assert done.step == 4 and done.losses == {}  # already there: nothing is done
    with pytest.raises(ConfigError, match="--size small"):
        resolve_config({"size": "small"}, run)
    assert full["arch"].get("quantizer", "gumbel") == quantizer


@pytest.mark.parametrize("levels", [(8, 8), (8, 8, 8), (5, 3)])
def test_fsq_reaches_every_code_and_its_points_round_trip(levels):
    k = math.prod(levels)
    axes = [torch.linspace(-4, 4, 60)] * len(levels)  # pre-bound values over every level's range
    z = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(len(levels), -1, 1)[None]  # [1, d, n, 1]
    points, codes = fsq_quantize(z, levels)
    assert sorted(set(codes.reshape(-1).tolist())) == list(range(k))  # every code reachable
    assert points.abs().max() <= 1 and torch.equal(fsq_points(codes, levels), points)


def test_fsq_model_encodes_and_decodes_what_it_trains_on():
    torch.manual_seed(0)
    arch = dvae_architecture("tiny", 32, "fsq")
    assert arch["quantizer"] == "fsq" and arch["levels"] == [8, 8] and arch["vocab_size"] == 64
    model = DiscreteVAE(arch).eval()
    assert not hasattr(model, "codebook")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, logits, codes = model(x, temperature=0.5)
        assert logits is None and codes.shape == (3, 8, 8) and int(codes.max()) < 64
        assert torch.equal(model.encode_codes(x), codes)
        torch.testing.assert_close(model.decode_codes(codes), recon)  # tokens -> image as trained
    x.requires_grad_(True)
    model.train()
    model(x, temperature=1.0)[0].square().mean().backward()  # the rounding passes its gradient
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="--quantizer vq"):
        dvae_architecture("tiny", 32, "vq")


def test_load_dvae_refuses_missing_files_and_other_kinds(tmp_path):
    from trainers.runtime.checkpoints import save_checkpoint

    with pytest.raises(ConfigError, match="--dvae .*nope.pt: no such checkpoint"):
        load_dvae(tmp_path / "nope.pt")
    save_checkpoint(tmp_path, 1, {"kind": "gan", "config": {}})
    with pytest.raises(ConfigError, match=r"not a `trainers dvae` checkpoint \(kind 'gan'\)"):
        load_dvae(tmp_path / "0000001.pt")


def test_cli_trains_encodes_and_reruns_nothing(cache, tmp_path):
    args = ["dvae", "--cache", cache, "--out", tmp_path, "--size", "tiny", "--steps", 3, "--batch-size", 4]
    result = runner.invoke(app, [str(a) for a in args + ["--eval-n", 4, "--device", "cpu"]])
    assert result.exit_code == 0, result.output
    run = tmp_path / "000-dvae"
    assert "dvae: step 3" in result.output and "held-out PSNR" in result.output
    assert str(run / "0000003.pt") in result.output
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "dvae" and config["data"]["n_train"] == 12 and config["arch"]["grid"] == [8, 8]

    encode = ["dvae", "--cache", str(cache), "--encode", str(run), "--device", "cpu", "--accept-lossy"]
    first = runner.invoke(app, encode)
    assert first.exit_code == 0, first.output
    assert "dvae --encode: encoded 16 image(s) in 2 shard(s)" in first.output and "tokens/" in first.output
    tokens = next((cache / "tokens").iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in tokens.rglob("*") if p.is_file()}
    again = runner.invoke(app, encode + ["--batch-size", 5])
    assert again.exit_code == 0, again.output
    assert "dvae --encode: 2 shard(s) up to date" in again.output
    assert mtimes == {p: p.stat().st_mtime_ns for p in tokens.rglob("*") if p.is_file()}

    dry = runner.invoke(app, ["dvae", "--cache", str(cache), "--size", "tiny", "--dry-run"])
    assert dry.exit_code == 0 and json.loads(dry.output)["size"] == "tiny"
    assert "dvae" in runner.invoke(app, ["--help"]).output


def test_cli_errors_are_one_line(cache, tmp_path):
    from trainers.autoencoders.vae.config import VaeConfig
    from trainers.autoencoders.vae.train import run_vae

    vae = run_vae(VaeConfig(cache=cache, out=tmp_path / "v", size="tiny", steps=1, batch_size=4, eval_n=2))
    base = ["dvae", "--cache", cache, "--out", tmp_path]
    user_error(base + ["--size", "huge"], "--size huge")
    user_error(["dvae", "--out", tmp_path], "--cache is required")
    user_error(["dvae", "--cache", tmp_path / "nope", "--out", tmp_path, "--size", "tiny"], "no such dir")
    user_error(base + ["--kl-weight", -1], "--kl-weight")
    user_error(base + ["--tau-end", 0], "--tau-end")
    user_error(["dvae", "--cache", cache, "--encode", tmp_path / "none.pt"], "--encode")
    user_error(["dvae", "--cache", cache, "--encode", vae.checkpoint], "not a `trainers dvae` checkpoint")
    user_error(["dvae", "--encode", vae.checkpoint], "--cache is required")
    user_error(["dvae", "--resume", vae.checkpoint], "not a `trainers dvae` checkpoint (kind 'vae')")
    assert not list(tmp_path.glob("0*-dvae"))
