"""`trainers ldm`: the DiT's shapes and adaLN-zero start, the guided Euler sampler (g = 0 is
unconditional exactly), training steps, bit-for-bit resume, --init, --paired-limit, `load_ldm_generator`
and the CLI (success and one-line errors)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_cache
from typer.testing import CliRunner

from cli.trainers import app
from core.errors import ConfigError
from trainers.autoencoders.vae.config import VaeConfig
from trainers.autoencoders.vae.train import run_vae
from trainers.data.loader import LoaderConfig, make_loader
from trainers.families.ldm.config import LdmConfig
from trainers.families.ldm.model import LDM_SIZES, Dit, ldm_architecture, sample_euler, timestep_embedding
from trainers.families.ldm.sample import load_ldm_generator
from trainers.families.ldm.train import resolve_config, run_ldm

H_DIM = 64  # lafite-tiny
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(cache, vae checkpoint): a 16-image cache and a 1-step tiny VAE."""
    root = tmp_path_factory.mktemp("ldm-world")
    cache = tiny_cache(root)
    vae = run_vae(
        VaeConfig(cache=cache, out=root / "runs", size="tiny", steps=1, batch_size=4, eval_n=2, device="cpu")
    )
    return cache, vae.checkpoint


def tiny_config(world, tmp_path, **overrides) -> LdmConfig:
    cache, vae = world
    values = dict(
        cache=cache,
        vae=vae,
        out=tmp_path / "runs",
        size="tiny",
        condition="perturb",
        steps=2,
        batch_size=4,
        device="cpu",
        checkpoint_every=0,
        log_every=1,
        sample_every=0,
        sample_steps=2,
        samples_per_prompt=1,
    )
    return LdmConfig(**{**values, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (adaLN-zero would otherwise make the output ignore the condition)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tiny_arch(**kw):
    return ldm_architecture("tiny", 4, 8, H_DIM, 1.0) | kw


# --- model and sampler --------------------------------------------------------------------------------


def test_registry_and_adaln_zero_start():
    assert set(LDM_SIZES) == {"tiny", "S", "B"}
    torch.manual_seed(0)
    model = Dit(tiny_arch())
    x, t, h = torch.randn(3, 4, 8, 8), torch.rand(3), F.normalize(torch.randn(3, H_DIM), dim=1)
    v = model(x, t, h)
    assert v.shape == x.shape and float(v.detach().abs().max()) == 0.0  # zero-init final layer
    randomize(model)
    assert not torch.equal(model(x, t, h), model(x, t, h, torch.ones(3, dtype=torch.bool)))
    with pytest.raises(ConfigError, match="--size huge"):
        ldm_architecture("huge", 4, 8, H_DIM, 1.0)


@pytest.mark.parametrize("h_dim", [64, 512])
def test_the_condition_starts_as_large_as_the_timestep(h_dim):
    """A unit-norm condition enters the blocks with the timestep's magnitude at initialisation, not some
    10x below it (0.05-0.11 of it without `cond_scale`)."""
    torch.manual_seed(0)
    arch = ldm_architecture("tiny", 4, 8, h_dim, 1.0)
    model = Dit(arch)
    h, t = F.normalize(torch.randn(256, h_dim), dim=1), torch.rand(256)
    with torch.no_grad():
        t_std = model.t_embed(timestep_embedding(t)).std()
        ratio = float(model.h_embed(h * arch["cond_scale"]).std() / t_std)
        unscaled = float(model.h_embed(h).std() / t_std)
    assert 0.5 < ratio < 3 and unscaled < 0.2
    old = Dit({k: v for k, v in arch.items() if k != "cond_scale"})  # a checkpoint made before it
    old.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 8, 8)
    randomize(model), randomize(old)
    assert torch.equal(old(x, t[:2], h[:2] * arch["cond_scale"]), model(x, t[:2], h[:2]))


def _euler(model, noise, h, steps, drop):
    ts = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    for i in range(steps):
        x = x - (ts[i] - ts[i + 1]) * model(x, ts[i].expand(len(x)), h, drop)
    return x


def test_guidance_zero_is_unconditional_and_one_is_conditional():
    model = randomize(Dit(tiny_arch())).eval()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    h = F.normalize(torch.randn(2, H_DIM, generator=g), dim=1)
    other = F.normalize(torch.randn(2, H_DIM, generator=g), dim=1)
    null = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        uncond = _euler(model, noise, other, 3, null)  # the condition is ignored under the null mask
        cond = _euler(model, noise, h, 3, None)
    assert not torch.allclose(uncond, cond, atol=1e-3)  # the model does depend on h
    assert torch.equal(sample_euler(model, noise, h, steps=3, guidance=0.0), uncond)
    assert torch.equal(sample_euler(model, noise, h, steps=3, guidance=1.0), cond)
    guided = sample_euler(model, noise, h, steps=1, guidance=3.0)
    with torch.no_grad():
        t = torch.ones(2)
        v_u, v_c = model(noise, t, h, null), model(noise, t, h)
    assert torch.allclose(guided, noise - (v_u + 3.0 * (v_c - v_u)), atol=1e-6)


# --- training, resume, init, few-shot -----------------------------------------------------------------


def test_steps_are_finite_and_resume_is_bit_for_bit(world, tmp_path):
    config = tiny_config(world, tmp_path, steps=3, checkpoint_every=1)
    result = run_ldm(config, progress=None)
    run = result.run_dir
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(
        torch.isfinite(torch.tensor(x["loss"])) for x in lines
    )
    full = torch.load(run / "0000003.pt", weights_only=True)
    cfg, state = resolve_config({}, run / "0000002.pt")
    again = run_ldm(cfg, resume_state=state)
    assert again.run_dir == run and again.step == 3
    resumed = torch.load(run / "0000003.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, tensor in full[part].items():
            assert torch.equal(tensor, resumed[part][name]), (part, name)
    assert full["arch"] == resumed["arch"] and full["arch"]["latent_scale"] > 0
    assert (run / "samples-0000003.png").is_file() and again.samples == [run / "samples-0000003.png"]
    assert sum(1 for _ in (run / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ConfigError, match="--size S"):
        resolve_config({"size": "S"}, run)


def test_pixel_space_trains_samples_and_resumes_bit_for_bit(world, tmp_path):
    config = tiny_config(world, tmp_path, space="pixel", vae=None, steps=3, checkpoint_every=1)
    run = run_ldm(config).run_dir
    full = torch.load(run / "0000003.pt", weights_only=True)
    arch = full["arch"]
    assert (arch["space"], arch["latent_channels"], arch["latent_size"], arch["patch"]) == ("pixel", 3, 32, 4)
    recorded = json.loads((run / "config.json").read_text())
    assert full["vae"]["path"] is None and recorded["space"] == "pixel"
    assert recorded["lr"] == LDM_SIZES["tiny"].lr == 1e-3  # the size's, recorded as trained with
    cfg, state = resolve_config({}, run / "0000002.pt")
    assert cfg.space == "pixel" and run_ldm(cfg, resume_state=state).step == 3
    resumed = torch.load(run / "0000003.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, tensor in full[part].items():
            assert torch.equal(tensor, resumed[part][name]), (part, name)
    _randomized_checkpoint(run / "0000003.pt", tmp_path / "random.pt")
    generate, info = load_ldm_generator(tmp_path / "random.pt", device="cpu")
    assert info["resolution"] == 32 and info["vae"] is None
    h = F.normalize(torch.randn(2, H_DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    images = generate(h, seed=1, steps=2)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, generate(h, seed=1, steps=2)) and images.float().std() > 0


def _randomized_checkpoint(src, dst):
    ckpt = torch.load(src, weights_only=True)
    for part in ("model", "ema"):
        g = torch.Generator().manual_seed(5)
        ckpt[part] = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in ckpt[part].items()}
    torch.save(ckpt, dst)
    return ckpt


def test_init_loads_matching_weights_and_refuses_others(world, tmp_path):
    base = run_ldm(tiny_config(world, tmp_path, steps=1))
    init = _randomized_checkpoint(base.checkpoint, tmp_path / "init.pt")
    tuned = run_ldm(tiny_config(world, tmp_path, steps=1, lr=1e-12, name="tuned", init=tmp_path / "init.pt"))
    weights = torch.load(tuned.checkpoint, weights_only=True)["model"]
    for name, tensor in init["model"].items():  # a ~zero lr step keeps the init's weights
        assert torch.allclose(tensor, weights[name], atol=1e-6), name
    fresh = torch.load(base.checkpoint, weights_only=True)["model"]
    assert not torch.allclose(fresh["final.weight"], weights["final.weight"], atol=1e-3)

    wrong = torch.load(tmp_path / "init.pt", weights_only=True)
    wrong["arch"] = {**wrong["arch"], "width": 32}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(
        ConfigError, match=r"--init .*wrong.pt: its architecture does not match.*width 32 vs 64"
    ):
        run_ldm(tiny_config(world, tmp_path, init=tmp_path / "wrong.pt", name="bad"))
    with pytest.raises(ConfigError, match="--init .*not a `trainers ldm` checkpoint"):
        run_ldm(tiny_config(world, tmp_path, init=world[1], name="bad"))
    assert not list((tmp_path / "runs").glob("*-bad"))


def test_paired_limit_trains_on_exactly_n_pairs(world, tmp_path):
    cache, _ = world
    loader = make_loader(LoaderConfig(cache=cache, condition="caption", batch_size=4, paired_limit=5))
    seen, paired = set(), []
    for _ in range(5):  # 20 samples: four epochs of the 5 pairs
        batch = next(loader)
        seen.update(batch["key"])
        paired.extend(batch["paired"].tolist())
    assert len(seen) == 5 and all(paired)
    result = run_ldm(tiny_config(world, tmp_path, condition="caption", paired_limit=5))
    assert result.data["pairs"] == 5 and result.data["n_images"] == 5
    assert json.loads((result.run_dir / "config.json").read_text())["data"]["pairs"] == 5
    assert set((result.run_dir / "pairs.txt").read_text().split()) == seen  # the same seeded draw

    # Beside another condition the N pairs are mixed in (semi-supervised): every image, N of them paired.
    semi = run_ldm(tiny_config(world, tmp_path, paired_limit=5))
    assert semi.data["pairs"] == 5 and semi.data["n_images"] > 5 and semi.data["condition"] != "caption"
    assert len((semi.run_dir / "pairs.txt").read_text().split()) == 5
    with pytest.raises(ConfigError, match="--paired-limit"):
        tiny_config(world, tmp_path, paired_limit=0).validate()


# --- sampling ----------------------------------------------------------------------------------------


def test_generator_gives_images_and_guidance_zero_ignores_the_condition(world, tmp_path):
    base = run_ldm(tiny_config(world, tmp_path, steps=1))
    _randomized_checkpoint(base.checkpoint, tmp_path / "random.pt")
    generate, info = load_ldm_generator(tmp_path / "random.pt", device="cpu")
    assert info["kind"] == "ldm" and info["resolution"] == 32 and info["h_dim"] == H_DIM
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(3, H_DIM, generator=g), dim=1) for _ in range(2))
    for guidance in (0.0, 1.0, 3.0):
        images = generate(a, seed=1, steps=2, guidance=guidance)
        assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(generate(a, seed=1, steps=2, guidance=0.0), generate(b, seed=1, steps=2, guidance=0.0))
    assert not torch.equal(
        generate(a, seed=1, steps=2, guidance=1.0), generate(b, seed=1, steps=2, guidance=1.0)
    )
    assert torch.equal(generate(a, seed=4, steps=2), generate(a, seed=4, steps=2))  # seeded
    with pytest.raises(ValueError, match="cond must be"):
        generate(torch.zeros(2, 3), seed=0)


# --- CLI ----------------------------------------------------------------------------------------------


def _user_error(args, message):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip() and not x.startswith("warning")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_cli_trains_and_errors_are_one_line(world, tmp_path):
    cache, vae = world
    base = ["ldm", "--cache", cache, "--vae", vae, "--out", tmp_path, "--size", "tiny", "--device", "cpu"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# the grid's rows\na photo of my cat\n\na photo of my dog\n")
    result = runner.invoke(
        app,
        [
            str(a)
            for a in base
            + [
                "--steps",
                1,
                "--batch-size",
                4,
                "--condition",
                "caption",
                "--paired-limit",
                3,
                "--allow-partial",
                "--prompts",
                prompts,
            ]
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ldm: step 1" in result.output and "(3 pairs)" in result.output
    config = json.loads((tmp_path / "000-ldm" / "config.json").read_text())
    assert config["prompts"] == ["a photo of my cat", "a photo of my dog"]  # the sample grid's rows
    assert config["allow_partial"] is True and config["data"]["partial"] is False  # the cache is whole
    assert config["data"]["n_images"] == 3 and config["data"]["shards"] == {"embed": [0, 1]}
    assert {"0000001.pt", "samples-0000001.png", "config.json"} <= {
        p.name for p in (tmp_path / "000-ldm").iterdir()
    }
    _user_error(base + ["--size", "huge"], "--size huge")
    _user_error(base + ["--paired-limit", 0], "--paired-limit")
    _user_error(base + ["--condition", "perturb", "--init", vae], "--init")
    _user_error(["ldm", "--cache", cache, "--vae", tmp_path / "none.pt", "--out", tmp_path], "--vae")
    _user_error(["ldm", "--resume", tmp_path / "missing.pt"], "--resume")
    _user_error(base + ["--space", "pixel"], "--vae is for --space latent")
    _user_error(["ldm", "--cache", cache, "--out", tmp_path, "--space", "voxel"], "--space voxel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000-ldm", "prompts.txt"]


def test_config_replace_keeps_validation():
    with pytest.raises(ConfigError, match="--vae is required"):
        replace(LdmConfig(cache="c"), size="tiny").validate()


def test_sample_command_takes_ldm_checkpoints_with_steps_and_guidance(world, tmp_path):
    from trainers.families.load import load_generator

    run = run_ldm(tiny_config(world, tmp_path, steps=1))
    generate, info = load_generator(run.checkpoint, device="cpu", steps=2, guidance=0.0)
    assert info["kind"] == "ldm"
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(2, H_DIM, generator=g), dim=1) for _ in range(2))
    assert torch.equal(generate(a, seed=3), generate(b, seed=3))  # guidance 0 was applied
    out = tmp_path / "grid.png"
    args = [
        "sample",
        "--checkpoint",
        run.checkpoint,
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue star",
        "--n",
        2,
        "--steps",
        2,
        "--guidance",
        2.0,
        "--out",
        out,
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [str(x) for x in args])
    assert result.exit_code == 0, result.output
    assert out.is_file() and len(list((tmp_path / "grid").glob("*.png"))) == 4
