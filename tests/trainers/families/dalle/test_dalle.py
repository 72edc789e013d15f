"""`trainers dalle`: a short run lowers the loss below a uniform guess and the tokens' own entropy, resume is
bit-for-bit, the token cache is used where it has rows (the rest encoded on the fly) and refused when it is
another dVAE's, --init, `load_dalle` through `trainers sample`'s registry (sampler options pass through,
guidance 0 ignores the condition), the CLI of `trainers dalle`, `sample` and `eval` on a dalle checkpoint,
and one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_cache
from typer.testing import CliRunner

from cli.trainers import app
from core.errors import ConfigError
from trainers.autoencoders.dvae.config import DvaeConfig
from trainers.autoencoders.dvae.encode import dvae_digest, encode_tokens, load_token_cache, tokens_stage
from trainers.autoencoders.dvae.train import run_dvae
from trainers.engine.loop import lr_at
from trainers.families.dalle.config import DalleConfig
from trainers.families.dalle.train import resolve_config, run_dalle
from trainers.families.load import load_generator
from trainers.runtime.checkpoints import save_checkpoint

H_DIM = 64  # lafite-tiny
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def _dvae(cache, out, seed, steps):
    config = DvaeConfig(
        cache=cache, out=out, size="tiny", steps=steps, batch_size=8, lr=3e-3, eval_n=2, anneal_steps=20,
        seed=seed, checkpoint_every=0, device="cpu",
    )  # fmt: skip
    return run_dvae(config).checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    """(cache, dvae checkpoint): 16 images in 2 embed shards, a tiny dVAE trained 30 steps (its codes
    differ between images), and its tokens for shard 0 only (shard 1's 8 images are encoded on the fly)."""
    root = tmp_path_factory.mktemp("dalle-world")
    cache = tiny_cache(root)
    dvae = _dvae(cache, root / "runs", seed=0, steps=30)
    encode_tokens(cache, dvae, device="cpu")
    (cache / tokens_stage(load_token_cache(cache, dvae).dvae_digest) / "00001.parquet").unlink()
    assert len(load_token_cache(cache, dvae)) == 8
    return cache, dvae


def tiny_config(world, tmp_path, **overrides) -> DalleConfig:
    cache, dvae = world
    values = dict(
        cache=cache, dvae=dvae, out=tmp_path / "runs", size="tiny", condition="perturb", steps=2,
        batch_size=4, lr=3e-3, warmup=2, device="cpu", checkpoint_every=0, log_every=1, sample_every=0,
        samples_per_prompt=1,
    )  # fmt: skip
    return DalleConfig(**{**values, **overrides})


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _token_entropy(cache, dvae) -> float:
    """Entropy (nats) of the dVAE's code frequencies over the cache's images: what a model that knows only
    how often each code occurs (not where, nor for which condition) scores."""
    from feature_cache.embed_rows import read_embed
    from trainers.autoencoders.dvae.encode import image_tokens
    from trainers.autoencoders.dvae.model import load_dvae

    model, _ = load_dvae(dvae)
    rows = read_embed(cache)
    try:
        tokens = image_tokens(model, rows.pixels(range(len(rows))))  # [N, 64]
    finally:
        rows.images.close()
    p = torch.bincount(tokens.reshape(-1), minlength=64).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


# --- training ------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_below_the_token_entropy(world, tmp_path):
    cache, dvae = world
    config = tiny_config(world, tmp_path, steps=80, batch_size=8, warmup=5, cond_drop=0.1)
    result = run_dalle(config)
    lines = _metrics(result.run_dir)
    assert [x["step"] for x in lines] == list(range(1, 81))
    first = sum(x["loss"] for x in lines[:5]) / 5
    last = sum(x["loss"] for x in lines[-5:]) / 5
    entropy = _token_entropy(cache, dvae)
    print(f"dalle tiny: loss {first:.3f} -> {last:.3f}, uniform {math.log(64):.3f}, entropy {entropy:.3f}")
    assert first == pytest.approx(math.log(64), abs=0.3)  # GPT-2 init: about a uniform guess
    assert last < entropy - 0.1, (first, last, entropy)  # it learnt where codes go, not just how often
    assert lines[0]["lr"] == pytest.approx(3e-3 / 5) and lines[-1]["lr"] < 1e-5  # warm-up, then cosine
    written = json.loads((result.run_dir / "config.json").read_text())
    assert written["kind"] == "dalle" and written["tokens"]["cached"] == 8  # shard 0 cached, 1 encoded
    assert written["arch"]["vocab"] == 64 and (written["arch"]["grid_h"], written["arch"]["grid_w"]) == (8, 8)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    keys = {"model", "ema", "opt", "drop_rng", "rng", "step", "config", "arch", "clip", "dvae", "data"}
    assert keys <= set(ckpt)
    assert ckpt["kind"] == "dalle" and ckpt["step"] == 80 and ckpt["dvae"]["path"] == str(dvae.resolve())
    assert ckpt["dvae"]["digest"] == dvae_digest(dvae) and ckpt["data"]["n_images"] == 16
    assert result.samples == [result.run_dir / "samples-0000080.png"] and result.samples[0].is_file()


def test_lr_schedule():
    config = DalleConfig(lr=1.0, steps=10, warmup=4)
    rates = [lr_at(s, config) for s in range(10)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0] and rates[4] == 1.0 and rates[-1] < 0.1
    assert lr_at(0, DalleConfig(lr=1.0, steps=10, warmup=0)) == 1.0
    assert lr_at(0, DalleConfig(lr=1.0, steps=2, warmup=100)) == 1.0  # clamped to steps // 2


def test_resume_is_bit_for_bit(world, tmp_path):
    config = tiny_config(world, tmp_path, steps=4, checkpoint_every=2, cond_drop=0.5, dropout=0.1)
    run = run_dalle(config).run_dir
    full = torch.load(run / "0000004.pt", weights_only=True)
    cfg, state = resolve_config({}, run / "0000002.pt")
    again = run_dalle(cfg, resume_state=state)
    assert again.run_dir == run and again.step == 4
    resumed = torch.load(run / "0000004.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, tensor in full[part].items():
            assert torch.equal(tensor, resumed[part][name]), (part, name)
    assert torch.equal(full["drop_rng"], resumed["drop_rng"])
    assert [x["step"] for x in _metrics(run)] == [1, 2, 3, 4]  # the redone steps are not doubled
    assert run_dalle(resolve_config({}, run)[0]).losses == {}  # already there: nothing is done
    with pytest.raises(ConfigError, match="--size small"):
        resolve_config({"size": "small"}, run)
    with pytest.raises(ConfigError, match="--cond-drop"):
        resolve_config({"cond_drop": 0.2}, run)
    assert resolve_config({"top_k": 5}, run)[0].top_k == 5  # a sampling default may change


def test_init_loads_matching_weights_and_refuses_others(world, tmp_path):
    base = run_dalle(tiny_config(world, tmp_path, steps=1))
    tuned = run_dalle(tiny_config(world, tmp_path, steps=1, lr=1e-12, name="tuned", init=base.run_dir))
    start, weights = (torch.load(p, weights_only=True)["model"] for p in (base.checkpoint, tuned.checkpoint))
    for name, tensor in start.items():  # a ~zero lr step keeps the init's weights
        assert torch.allclose(tensor, weights[name], atol=1e-6), name
    with pytest.raises(ConfigError, match=r"--init .*its architecture does not match.*n_prefix 4 vs 2"):
        run_dalle(tiny_config(world, tmp_path, init=base.checkpoint, n_prefix=2, name="bad"))
    assert not list((tmp_path / "runs").glob("*-bad"))


# --- sampling --------------------------------------------------------------------------------------------


def _randomized(src, dst):
    """The checkpoint with unit-scale random EMA weights (the condition projection scaled up for unit-norm
    features), so samples depend on the condition: a 1-step model's hardly do."""
    ckpt = torch.load(src, weights_only=True)
    g = torch.Generator().manual_seed(5)
    for name, v in ckpt["ema"].items():
        noise = torch.randn(v.shape, generator=g)
        if name == "cond_proj.weight":
            ckpt["ema"][name] = 3 * noise
        elif v.dim() >= 2:
            ckpt["ema"][name] = noise / math.sqrt(v.shape[-1])
        else:
            ckpt["ema"][name] = 1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise
    torch.save(ckpt, dst)
    return dst


def test_sample_registry_passes_options_and_guidance_zero_ignores_the_condition(world, tmp_path):
    base = run_dalle(tiny_config(world, tmp_path, steps=1))
    path = _randomized(base.checkpoint, tmp_path / "random.pt")
    generate, info = load_generator(path, device="cpu")
    assert info["kind"] == "dalle" and info["resolution"] == 32 and info["h_dim"] == H_DIM
    assert info["guidance"] == 3.0 and info["top_k"] is None and info["dvae"] == str(world[1].resolve())
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(3, H_DIM, generator=g), dim=1) for _ in range(2))
    images = generate(a, seed=1)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, generate(a, seed=1)) and not torch.equal(images, generate(a, seed=2))
    assert not torch.equal(generate(a, seed=1, guidance=1.0), generate(b, seed=1, guidance=1.0))
    uncond, _ = load_generator(path, device="cpu", guidance=0.0)
    assert torch.equal(uncond(a, seed=1), uncond(b, seed=1))  # guidance 0: the null condition only
    greedy, _ = load_generator(path, device="cpu", top_k=1, temperature=0.5, steps=9)  # steps: not dalle's
    assert torch.equal(greedy(a, seed=0), greedy(a, seed=7))  # top-k 1 is greedy: no noise left
    with pytest.raises(ValueError, match="cond must be"):
        generate(torch.zeros(2, 3), seed=0)


def _user_error(args, message):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip() and not x.startswith("warning")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_sample_refuses_a_missing_or_changed_dvae(world, tmp_path):
    base = run_dalle(tiny_config(world, tmp_path, steps=1))
    ckpt = torch.load(base.checkpoint, weights_only=True)
    sample = ["sample", "--prompt", "a red circle", "--n", 1, "--device", "cpu", "--out", tmp_path / "s.png"]
    moved = {**ckpt, "dvae": {**ckpt["dvae"], "path": str(tmp_path / "gone" / "0000030.pt")}}
    torch.save(moved, tmp_path / "moved.pt")
    _user_error(sample + ["--checkpoint", tmp_path / "moved.pt"], "is missing (moved or deleted)")
    changed = {**ckpt, "dvae": {**ckpt["dvae"], "digest": "0" * 32}}
    torch.save(changed, tmp_path / "changed.pt")
    _user_error(sample + ["--checkpoint", tmp_path / "changed.pt"], "not the one it was trained with")


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_trains_samples_and_evaluates(world, tmp_path):
    from trainers.probe.config import ProbeConfig
    from trainers.probe.probe import save_probe, train_probe

    cache, dvae = world
    base = ["dalle", "--cache", cache, "--dvae", dvae.parent, "--out", tmp_path, "--size", "tiny"]
    args = base + ["--steps", 2, "--batch-size", 4, "--condition", "caption", "--paired-limit", 3]
    args += ["--device", "cpu", "--top-k", 8, "--sample-every", 0, "--prompts", tmp_path / "prompts.txt"]
    (tmp_path / "prompts.txt").write_text("a photo of my cat\n")
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    run = tmp_path / "000-dalle"
    assert "dalle: step 2" in result.output and "(3 pairs)" in result.output
    assert str(run / "0000002.pt") in result.output
    config = json.loads((run / "config.json").read_text())
    assert config["top_k"] == 8 and config["data"]["n_images"] == 3 and config["dvae"] == str(dvae.parent)
    assert config["prompts"] == ["a photo of my cat"]  # the sample grid's one row
    files = {p.name for p in run.iterdir()}
    assert {"0000002.pt", "samples-0000002.png", "config.json", "pairs.txt"} <= files
    again = runner.invoke(app, ["dalle", "--resume", str(run)])
    assert again.exit_code == 0 and "already at step 2" in again.output, again.output
    dry = runner.invoke(app, [str(a) for a in base + ["--dry-run"]])
    assert dry.exit_code == 0 and json.loads(dry.output)["size"] == "tiny"

    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", run, "--prompt", "a red circle", "--prompt", "a blue star", "--n", 2]
    sample = runner.invoke(app, [str(x) for x in args + ["--guidance", 2.0, "--out", out, "--device", "cpu"]])
    assert sample.exit_code == 0, sample.output
    assert out.is_file() and len(list((tmp_path / "grid").glob("*.png"))) == 4

    probe = save_probe(
        train_probe(ProbeConfig(image_size=32, n_train=64, epochs=1, n_eval=0, device="cpu")),
        tmp_path / "probe.pt",
    )
    args = ["eval", "--checkpoint", run / "0000002.pt", "--cache", cache, "--out", tmp_path / "eval"]
    args += ["--n", 8, "--batch-size", 4, "--probe", probe, "--device", "cpu"]
    evaluated = runner.invoke(app, [str(x) for x in args])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["n"] == 8 and report["checkpoint"] == str(run / "0000002.pt")
    assert report["training_data"]["n_images"] == 3


def test_cli_errors_are_one_line(world, tmp_path):
    cache, dvae = world
    other = _dvae(cache, tmp_path / "other", seed=1, steps=1)  # a dVAE the cache has no tokens of
    save_checkpoint(tmp_path / "fake", 1, {"kind": "ldm", "config": {}})
    save_checkpoint(tmp_path / "fake", 2, {"kind": "gan", "config": {}})
    base = ["dalle", "--cache", cache, "--out", tmp_path / "runs", "--size", "tiny", "--device", "cpu"]
    with_dvae = base + ["--dvae", dvae]
    _user_error(base, "--dvae is required")
    _user_error(base + ["--dvae", tmp_path / "none.pt"], "--dvae")
    for step, kind in ((1, "ldm"), (2, "gan")):
        fake = tmp_path / "fake" / f"{step:07d}.pt"
        _user_error(base + ["--dvae", fake], f"not a `trainers dvae` checkpoint (kind '{kind}')")
    _user_error(base + ["--dvae", other], "were made by another dVAE")
    _user_error(with_dvae + ["--init", dvae], "--init ")
    _user_error(with_dvae + ["--init", dvae.parent], "not a `trainers dalle` checkpoint (kind 'dvae')")
    _user_error(["dalle", "--resume", dvae], "not a `trainers dalle` checkpoint (kind 'dvae')")
    _user_error(with_dvae + ["--size", "huge"], "--size huge")
    _user_error(with_dvae + ["--cond-drop", 1], "--cond-drop")
    _user_error(with_dvae + ["--top-p", 0], "--top-p")
    _user_error(with_dvae + ["--paired-limit", 0], "--paired-limit")
    sample = ["sample", "--checkpoint", dvae, "--prompt", "a red circle", "--out", tmp_path / "s.png"]
    _user_error(sample, "not a `trainers gan` or `trainers ldm` or `trainers dalle` checkpoint (kind 'dvae')")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "s.png").exists()


def test_a_moved_dvae_can_be_named_on_resume(world, tmp_path):
    cache, dvae = world
    copy = tmp_path / "dvae" / "0000030.pt"
    copy.parent.mkdir()
    shutil.copy(dvae, copy)
    run = run_dalle(tiny_config(world, tmp_path, dvae=copy, steps=1)).run_dir
    moved = tmp_path / "moved.pt"
    copy.rename(moved)
    with pytest.raises(ConfigError, match="--dvae"):
        run_dalle(resolve_config({"steps": 2}, run)[0])
    result = run_dalle(*resolve_config({"steps": 2, "dvae": moved}, run))
    assert result.step == 2
    other = _dvae(cache, tmp_path / "other", seed=1, steps=1)
    with pytest.raises(ConfigError, match="not the dVAE this run was trained with"):
        run_dalle(*resolve_config({"steps": 3, "dvae": other}, run))
