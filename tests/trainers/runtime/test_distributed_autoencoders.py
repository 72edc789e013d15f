"""`trainers vae` and `trainers dvae` data-parallel under torchrun (trainers/runtime/distributed.py), on the
CPU with gloo: 2 processes take the same steps as 1 at the same global batch (posterior and gumbel noise
drawn for the global batch, the autoencoder's and the discriminator's gradients averaged), a dVAE run
resumes with another world size, and `--encode` refuses torchrun."""

from __future__ import annotations

import json

import pytest
import torch
from factories import tiny_cache
from torchrun import assert_close, assert_same_metrics, checkpoint, lrs_of, metrics, trainers
from typer.testing import CliRunner

from cli.trainers import app
from trainers.autoencoders.dvae.model import DiscreteVAE
from trainers.autoencoders.vae.model import AutoencoderKL


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("ddp-ae-cache"))


def vae_output(model: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    mean, logvar = model.encode(x)
    return torch.cat([model.decode(mean).flatten(1), logvar.flatten(1)], dim=1)


def dvae_output(model: DiscreteVAE, x: torch.Tensor) -> torch.Tensor:
    return model.decode_soft(model.logits(x).softmax(dim=1))


def assert_same_autoencoder(make, output, one: dict, two: dict) -> None:
    """The weights `one` and `two` equal to float tolerance, but for those the output does not depend on:
    a bias right before a GroupNorm with one channel per group (tiny's 8-channel layers), which subtracts
    it again. Its gradient is zero but for rounding, which Adam divides by its own scale into steps of
    about lr, so there two runs differ by up to steps x lr (1e-4 to 1e-3 seen), everywhere else by < 1e-5.
    Those biases are found by their float64 gradient (~1e-13, the others' >= 1), and the two models'
    outputs are compared as well."""
    models = []
    for state in (one, two):
        models.append(make(state["arch"]))
        models[-1].load_state_dict(state["model"])
    x = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1  # [4, 3, R, R]
    probe = make(one["arch"]).double()
    probe.load_state_dict(one["model"])
    out = output(probe, x.double())
    out.mul(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).double()).sum().backward()
    unseen = {n for n, p in probe.named_parameters() if float(p.grad.abs().max()) < 1e-9}
    assert unseen and all(n.endswith(".bias") for n in unseen), unseen
    seen = [{k: v for k, v in state["model"].items() if k not in unseen} for state in (one, two)]
    assert_close(*seen, lrs_of(one["config"], one["step"]))
    with torch.no_grad():
        diff = float((output(models[0], x) - output(models[1], x)).abs().max())
    assert diff <= 1e-4, f"the outputs differ by {diff:.2e}"


def ae_args(kind: str, cache, out, steps: int, *more) -> list:
    args = [kind, "--cache", cache, "--out", out, "--size", "tiny", "--steps", steps, "--batch-size", 8]
    return [*args, "--device", "cpu", *more]


def test_two_vae_processes_take_the_one_process_steps_with_the_discriminator(cache, tmp_path):
    disc = ("--disc-weight", 0.1, "--disc-start", 0)  # adversarial from step 0: both optimisers step
    trainers(ae_args("vae", cache, tmp_path / "one", 3, *disc))
    trainers(ae_args("vae", cache, tmp_path / "two", 3, *disc), nproc=2)
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 3
    assert one["opt"]["state"][0]["step"] == one["disc_opt"]["state"][0]["step"] == 3  # both trained
    assert_same_autoencoder(AutoencoderKL, vae_output, one, two)
    assert_close(one["disc"], two["disc"], lrs_of(one["config"]))
    (run,) = (tmp_path / "two").iterdir()  # rank 0 alone wrote: one run, one metrics line (the last step)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1 and (run / "eval.json").exists()
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "two"))  # the global batch's losses


def dvae_args(cache, out, steps: int, *more) -> list:
    # both schedules move within the 3 steps, and do not depend on --steps (a resume changes it); the
    # gumbel quantiser, whose noise is drawn for the global batch (fsq draws none)
    args = ["--anneal-steps", 2, "--kl-warmup", 1, "--quantizer", "gumbel"]
    return ae_args("dvae", cache, out, steps, *args, *more)


def last_metrics(out) -> dict:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def one_process_dvae_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("dvae-one")
    trainers(dvae_args(cache, out, 3))
    return out


@pytest.fixture(scope="module")
def one_process_dvae(one_process_dvae_run):
    return checkpoint(one_process_dvae_run)


def test_two_dvae_processes_take_the_one_process_steps(cache, tmp_path, one_process_dvae_run):
    trainers(dvae_args(cache, tmp_path, 3), nproc=2)
    one, two = checkpoint(one_process_dvae_run), checkpoint(tmp_path)
    assert one["step"] == two["step"] == 3
    assert one["opt"]["state"][0]["step"] == 3
    assert_same_autoencoder(DiscreteVAE, dvae_output, one, two)
    # the logged batch perplexity is of the gathered global batch's codes (rank 0's 4 images use fewer)
    perplexity = last_metrics(one_process_dvae_run)["batch_perplexity"]
    assert last_metrics(tmp_path)["batch_perplexity"] == pytest.approx(perplexity, rel=1e-4)
    # and the losses are the global batch's: averaged over the ranks
    assert_same_metrics(metrics(one_process_dvae_run), metrics(tmp_path))


def test_a_two_process_dvae_run_resumes_as_one_process(cache, tmp_path, one_process_dvae):
    trainers(dvae_args(cache, tmp_path, 2, "--checkpoint-every", 1), nproc=2)
    (run,) = tmp_path.iterdir()
    trainers(["dvae", "--resume", run, "--steps", 3, "--device", "cpu"])
    resumed = checkpoint(tmp_path)
    assert resumed["step"] == 3
    assert_same_autoencoder(DiscreteVAE, dvae_output, one_process_dvae, resumed)


@pytest.mark.parametrize("kind", ["vae", "dvae"])
def test_encode_under_torchrun_is_refused_in_one_line(cache, tmp_path, monkeypatch, kind):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, [kind, "--cache", str(cache), "--encode", str(tmp_path / "ckpt")])
    assert result.exit_code == 2
    assert f"--encode runs as one process: run `trainers {kind} --encode` without torchrun" in result.output
    assert not (cache / ("latents" if kind == "vae" else "tokens")).exists()
