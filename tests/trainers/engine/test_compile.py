"""`--compile BACKEND` (trainers/engine/loop.py::compiled): the training forward under torch.compile takes the
eager steps. On the CPU with `aot_eager` (dynamo's tracing and autograd's graph capture, without the
inductor compiler, which is for GPUs and minutes slower here), so the test checks that each model's
training step compiles and gives the eager numbers; whether inductor is faster is a GPU measurement."""

from __future__ import annotations

import pytest
from factories import tiny_cache
from torchrun import assert_close, checkpoint, lrs_of, trainers
from typer.testing import CliRunner

from cli.trainers import app


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("compile-cache"))


def both(args: list, tmp_path) -> tuple[dict, dict]:
    trainers([*args, "--out", tmp_path / "eager"])
    trainers([*args, "--out", tmp_path / "compiled", "--compile", "aot_eager"])
    return checkpoint(tmp_path / "eager"), checkpoint(tmp_path / "compiled")


def test_a_compiled_gan_takes_the_eager_steps(cache, tmp_path):
    gan = ["gan", "--cache", cache, "--size", "tiny", "--steps", 2, "--batch-size", 8]
    eager, compiled = both([*gan, "--condition", "perturb", "--device", "cpu", "--sample-every", 0], tmp_path)
    assert compiled["config"]["compile"] == "aot_eager" and eager["config"]["compile"] is None
    for part in ("G", "G_ema", "D"):
        assert_close(eager[part], compiled[part], lrs_of(eager["config"]))


def test_a_compiled_ldm_takes_the_eager_steps(cache, tmp_path):
    vae = ["vae", "--cache", cache, "--out", tmp_path / "vae", "--size", "tiny", "--steps", 2]
    trainers([*vae, "--batch-size", 4, "--eval-n", 4, "--device", "cpu"])
    (vae_run,) = (tmp_path / "vae").iterdir()
    ldm = ["ldm", "--cache", cache, "--vae", vae_run, "--size", "tiny", "--steps", 2, "--batch-size", 8]
    eager, compiled = both([*ldm, "--condition", "perturb", "--device", "cpu"], tmp_path)
    assert_close(eager["model"], compiled["model"], lrs_of(eager["config"]))


def test_an_unknown_backend_is_one_line(cache, tmp_path):
    args = ["ldm", "--cache", cache, "--vae", tmp_path, "--out", tmp_path, "--compile", "nope"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: --compile nope: not a torch.compile")


def test_a_compiled_dalle_takes_the_eager_steps(cache, tmp_path):
    dvae = ["dvae", "--cache", cache, "--out", tmp_path / "dvae", "--size", "tiny", "--steps", 2]
    trainers([*dvae, "--batch-size", 4, "--eval-n", 2, "--device", "cpu"])
    (dvae_run,) = (tmp_path / "dvae").iterdir()
    dalle = ["dalle", "--cache", cache, "--dvae", dvae_run, "--size", "tiny", "--steps", 2, "--batch-size", 8]
    dalle += ["--condition", "perturb", "--device", "cpu", "--sample-every", 0]
    eager, compiled = both(dalle, tmp_path)
    assert_close(eager["model"], compiled["model"], lrs_of(eager["config"]))


def test_compiled_goes_through_dynamo_only_when_asked():
    import torch
    from torch._dynamo.utils import counters

    from trainers.engine.loop import compiled

    model = torch.nn.Linear(3, 2)
    assert compiled(model, None) is model
    torch._dynamo.reset()
    counters.clear()
    forward = compiled(model, "aot_eager")
    x = torch.randn(4, 3)
    torch.testing.assert_close(forward(x), model(x))
    assert counters["stats"]["unique_graphs"] == 1  # traced, not run eagerly
    assert forward.state_dict().keys() != model.state_dict().keys()  # why checkpoints save the module
