"""`trainers gan`: model shapes per size, the modulated conv's maths, the condition's effect, training
steps, bit-for-bit resume, checkpoints, run directories and the CLI (success and one-line errors)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from factories import TINY_CLIP
from typer.testing import CliRunner

from cli.trainers import app
from core.clip import load_clip
from core.errors import ConfigError
from trainers.families.gan.config import GanConfig
from trainers.families.gan.model import GAN_SIZES, ModulatedConv, architecture, build_models, count_params
from trainers.families.gan.train import DataSource, GanTrainer, resolve_config, run_gan
from trainers.runtime.checkpoints import list_checkpoints
from trainers.runtime.runs import new_run_dir

H_DIM = 64  # lafite-tiny's embedding size
PROMPTS = ("a red circle", "a large blue square on the left")


def fake_source(resolution: int = 32, batch_size: int = 4) -> DataSource:
    """Batches that are a pure function of the step, like the cache loader (so start_step resumes)."""

    def batches(start_step: int):
        for step in itertools.count(start_step):
            g = torch.Generator().manual_seed(10_000 + step)
            image = torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1  # [B, 3, R, R]
            cond = F.normalize(torch.randn(batch_size, H_DIM, generator=g), dim=1)  # [B, D]
            yield {
                "image": image,
                "cond": cond,
                "key": [f"{step}-{i}" for i in range(batch_size)],
                "paired": torch.zeros(batch_size, dtype=torch.bool),
            }

    return DataSource(batches, TINY_CLIP, "", H_DIM)


def tiny_config(tmp_path, **overrides) -> GanConfig:
    values = dict(
        out=tmp_path / "runs",
        size="tiny",
        condition="perturb",
        steps=2,
        batch_size=4,
        device="cpu",
        sample_every=0,
        checkpoint_every=0,
        log_every=1,
        prompts=PROMPTS,
        samples_per_prompt=2,
    )
    return GanConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(TINY_CLIP, None, "cpu")


# --- models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h_dim", [64, 512])
def test_the_condition_reaches_the_styles_as_large_as_w(h_dim):
    """A unit-norm condition enters the styles with w's magnitude, not 9-24x below it (without
    `cond_scale`); a checkpoint made before it (no `cond_scale` in its arch) keeps the old maths."""
    torch.manual_seed(0)
    arch = architecture("tiny", 32, h_dim)
    G, _ = build_models(arch)
    z, h = torch.randn(256, G.size.z_dim), F.normalize(torch.randn(256, h_dim), dim=1)
    with torch.no_grad():
        styles = G.styles(z, h)
        w, c = styles[:, : G.size.w_dim], styles[:, G.size.w_dim :]
        old, _ = build_models({k: v for k, v in arch.items() if k != "cond_scale"})
        old.load_state_dict(G.state_dict())
        c_old = old.styles(z, h)[:, G.size.w_dim :]
    assert 0.5 < float(c.std() / w.std()) < 2 and float(c_old.std() / w.std()) < 0.15
    assert torch.equal(old.styles(z, h * arch["cond_scale"]), styles)


@pytest.mark.parametrize("name", list(GAN_SIZES))
def test_each_size_builds_at_its_resolution(name):
    resolution = GAN_SIZES[name].resolutions[0]
    torch.manual_seed(0)
    G, D = build_models(architecture(name, resolution, H_DIM))
    z = torch.randn(2, G.size.z_dim)
    h = F.normalize(torch.randn(2, H_DIM), dim=1)
    with torch.no_grad():
        img = G(z, h)
        logits, f_s = D(img, h)
    assert img.shape == (2, 3, resolution, resolution)
    assert logits.shape == (2,) and f_s.shape == (2, H_DIM)
    assert torch.isfinite(img).all() and torch.isfinite(logits).all()


def test_sizes_grow_and_tiny_stays_tiny():
    counts = [
        sum(count_params(m) for m in build_models(architecture(n, GAN_SIZES[n].resolutions[0], H_DIM)))
        for n in ("tiny", "small", "base")
    ]
    assert counts[0] < 300_000 < counts[1] < counts[2]


def test_modulated_conv_equals_per_sample_weight_conv():
    """Scaling activations then demodulating = StyleGAN2's per-sample modulated, demodulated weights."""
    torch.manual_seed(0)
    conv = ModulatedConv(5, 7, 3, style_dim=6, resolution=8, noise=False, act=False)
    x, style = torch.randn(3, 5, 8, 8), torch.randn(3, 6)
    with torch.no_grad():
        out = conv(x, style)
        s = conv.affine(style)  # [B, c_in]
        w = conv.weight * conv.weight_gain * s[:, None, :, None, None]  # [B, c_out, c_in, k, k]
        w = w * torch.rsqrt(w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8)
        ref = (
            torch.stack([F.conv2d(x[i : i + 1], w[i], padding=1)[0] for i in range(3)])
            + conv.bias[:, None, None]
        )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_condition_changes_the_image_and_the_logit():
    torch.manual_seed(0)
    G, D = build_models(architecture("tiny", 32, H_DIM))
    z = torch.randn(4, G.size.z_dim)
    h1, h2 = F.normalize(torch.randn(2, 4, H_DIM), dim=2)
    with torch.no_grad():
        same_a = G(z, h1, torch.Generator().manual_seed(1))
        same_b = G(z, h1, torch.Generator().manual_seed(1))
        other = G(z, h2, torch.Generator().manual_seed(1))
        torch.testing.assert_close(same_a, same_b, rtol=0, atol=0)
        assert (same_a - other).abs().mean() > 0.05 * same_a.abs().mean()
        assert not torch.allclose(D(same_a, h1)[0], D(same_a, h2)[0])


# --- training -----------------------------------------------------------------------------------------


def test_training_steps_are_finite_and_move_both_networks(tmp_path, tiny_clip):
    config = tiny_config(tmp_path, r1_every=2, r1_gamma=1.0)
    torch.manual_seed(0)
    trainer = GanTrainer(config, architecture("tiny", 32, H_DIM), tiny_clip, torch.device("cpu"))
    g0 = [p.detach().clone() for p in trainer.G.parameters()]
    d0 = [p.detach().clone() for p in trainer.D.parameters()]
    batches = fake_source().batches(0)
    seen = [trainer.train_step(next(batches)) for _ in range(3)]
    assert "r1" in seen[0] and "r1" not in seen[1] and "r1" in seen[2]  # lazy: every r1_every steps
    for losses in seen:
        assert all(torch.isfinite(v) for v in losses.values()), losses
    assert any(not torch.equal(a, p) for a, p in zip(g0, trainer.G.parameters(), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(d0, trainer.D.parameters(), strict=True))
    assert trainer.step == 3


def test_contrastive_clip_loss_reaches_the_generator(tmp_path, tiny_clip):
    """L_ConG goes through the frozen CLIP into G (and not into CLIP)."""
    from trainers.families.gan.train import info_nce

    torch.manual_seed(0)
    trainer = GanTrainer(
        tiny_config(tmp_path), architecture("tiny", 32, H_DIM), tiny_clip, torch.device("cpu")
    )
    batch = next(fake_source().batches(0))
    fake = trainer.G(torch.randn(4, trainer.G.size.z_dim), batch["cond"])
    info_nce(trainer.clip_features(fake), batch["cond"], 0.5).backward()
    grads = [p.grad for p in trainer.G.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in tiny_clip.model.parameters())


def test_info_nce_prefers_matching_pairs():
    from trainers.families.gan.train import info_nce

    a = F.normalize(torch.randn(8, 16), dim=1)
    assert info_nce(a, a, 0.1) < info_nce(a, a.roll(1, dims=0), 0.1)


def _tensors(ckpt, prefix=""):
    """Every tensor in a checkpoint's nested dicts/lists, by path (RNG states included)."""
    if isinstance(ckpt, torch.Tensor):
        yield prefix, ckpt
    elif isinstance(ckpt, dict):
        for k, v in ckpt.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(ckpt, (list, tuple)):
        for i, v in enumerate(ckpt):
            yield from _tensors(v, f"{prefix}/{i}")


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if k != "images_per_s"} for m in lines}


def test_resume_continues_bit_for_bit(tmp_path):
    # r1_every=3: the regulariser fires at step index 3, after the resume point.
    common = dict(r1_every=3, r1_gamma=1.0, checkpoint_every=2)
    straight = run_gan(tiny_config(tmp_path / "a", steps=5, **common), fake_source(), progress=False)
    first = run_gan(tiny_config(tmp_path / "b", steps=2, **common), fake_source(), progress=False)
    config, ckpt = resolve_config({"steps": 5}, first.checkpoint)
    assert config.resume == first.checkpoint and config.size == "tiny"
    resumed = run_gan(config, fake_source(), resume_state=ckpt, progress=False)

    assert resumed.run_dir == first.run_dir and resumed.step == 5
    assert _losses(resumed.run_dir) == _losses(straight.run_dir)  # steps 1..5, incl. the ones after resume
    a = dict(_tensors(torch.load(straight.checkpoint, weights_only=True)))
    b = dict(_tensors(torch.load(resumed.checkpoint, weights_only=True)))
    assert a.keys() == b.keys() and any(k.startswith("/opt_D/state") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_init_starts_from_the_weights_with_fresh_optimisers(tmp_path):
    base = run_gan(tiny_config(tmp_path / "a", steps=2), fake_source(), progress=False)
    # lr 1e-30: a step barely moves the weights, so after one the model is still the init's (or not)
    tiny = dict(steps=1, lr=1e-30)
    tuned = run_gan(tiny_config(tmp_path / "b", init=base.run_dir, **tiny), fake_source(), progress=False)
    fresh = run_gan(tiny_config(tmp_path / "c", seed=1, **tiny), fake_source(), progress=False)
    start = torch.load(base.checkpoint, weights_only=True)
    after = torch.load(tuned.checkpoint, weights_only=True)
    other = torch.load(fresh.checkpoint, weights_only=True)
    for net in ("G", "D"):
        for name, weight in start[net].items():
            assert torch.allclose(after[net][name].float(), weight.float(), atol=1e-6), (net, name)
    assert any(not torch.equal(w, other["G"][k]) for k, w in start["G"].items())  # not a coincidence
    assert after["step"] == 1 and after["opt_G"]["state"][0]["step"] == 1  # a new run, fresh Adam
    assert after["config"]["init"] == str(base.run_dir)  # recorded as given (absolute)

    config = tiny_config(tmp_path / "d", init=base.checkpoint, size="small")
    with pytest.raises(ConfigError, match="--init .*architecture does not match"):
        run_gan(config, fake_source(resolution=64), progress=False)
    with pytest.raises(ConfigError, match="--init .*no such checkpoint"):
        run_gan(tiny_config(tmp_path / "e", init=tmp_path / "none.pt"), fake_source(), progress=False)


def test_checkpoint_holds_everything_and_loads_safely(tmp_path):
    result = run_gan(tiny_config(tmp_path, steps=1), fake_source(), progress=False)
    assert result.checkpoint.name == "0000001.pt"
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert {
        "G",
        "D",
        "G_ema",
        "opt_G",
        "opt_D",
        "step",
        "config",
        "arch",
        "clip",
        "rng",
        "kind",
    } <= ckpt.keys()
    assert ckpt["step"] == 1 and ckpt["kind"] == "gan" and ckpt["config"]["size"] == "tiny"
    assert ckpt["config"]["r1_gamma"] == pytest.approx(0.0002 * 32**2 / 4)  # the auto value, resolved
    # the size's lr, recorded as trained with (D's scaled for lazy R1); the architecture has none
    assert tiny_config(tmp_path).lr is None and ckpt["config"]["lr"] == GAN_SIZES["tiny"].lr
    assert ckpt["opt_G"]["param_groups"][0]["lr"] == GAN_SIZES["tiny"].lr
    assert ckpt["opt_D"]["param_groups"][0]["lr"] == pytest.approx(GAN_SIZES["tiny"].lr * 16 / 17)
    assert "lr" not in ckpt["arch"] and "lr" not in architecture("small", 64, H_DIM)
    assert {"torch", "numpy", "python"} <= ckpt["rng"].keys()
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["arch"]["resolution"] == 32 and config["clip"]["model"] == TINY_CLIP


def test_sample_grids_every_n_steps(tmp_path):
    from PIL import Image

    from trainers.engine.grid import LABEL_WIDTH

    result = run_gan(tiny_config(tmp_path, steps=3, sample_every=2), fake_source(), progress=False)
    assert [p.name for p in result.samples] == ["samples-0000002.png", "samples-0000003.png"]
    with Image.open(result.samples[0]) as grid:
        assert grid.size == (LABEL_WIDTH + 2 * 32, len(PROMPTS) * 32)


def test_run_dirs_are_numbered(tmp_path):
    assert new_run_dir(tmp_path, "a").name == "000-a"
    assert new_run_dir(tmp_path, "b").name == "001-b"
    (tmp_path / "007-old").mkdir()
    assert new_run_dir(tmp_path, "a").name == "008-a"
    with pytest.raises(ConfigError, match="--name"):
        new_run_dir(tmp_path, "../escape")


def test_a_run_stopped_before_its_first_step_leaves_no_run_folder(tmp_path, monkeypatch):
    """Ctrl-C (or an error) in its first step: the numbered folder the run opened is removed, so the next
    run takes its number; one stopped after a step keeps its folder, metrics and all."""
    from trainers.families.gan.train import GanTrainer

    step = GanTrainer.train_step

    def stop_at(n):
        def train_step(self, batch):
            if self.step == n:
                raise KeyboardInterrupt
            return step(self, batch)

        monkeypatch.setattr(GanTrainer, "train_step", train_step)

    stop_at(0)
    with pytest.raises(KeyboardInterrupt):
        run_gan(tiny_config(tmp_path, steps=3, log_every=1), fake_source(), progress=False)
    assert list((tmp_path / "runs").iterdir()) == []
    stop_at(1)
    with pytest.raises(KeyboardInterrupt):
        run_gan(tiny_config(tmp_path, steps=3, log_every=1), fake_source(), progress=False)
    (kept,) = (tmp_path / "runs").iterdir()
    assert kept.name == "000-gan" and (kept / "metrics.jsonl").read_text().count("\n") == 1


def test_resume_refuses_a_changed_architecture(tmp_path):
    result = run_gan(tiny_config(tmp_path, steps=1), fake_source(), progress=False)
    with pytest.raises(ConfigError, match="--size small: the checkpoint was trained with tiny"):
        resolve_config({"size": "small"}, result.run_dir)
    config, _ = resolve_config({"steps": 9, "size": "tiny"}, result.run_dir)  # same value: fine
    assert config.steps == 9 and config.resume == result.checkpoint


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"size": "huge"}, "--size huge"),
        ({"batch_size": 1}, "--batch-size"),
        ({"condition": "x"}, "--condition"),
        ({"lr": -1.0}, "--lr"),
        ({"tau": 0.0}, "--tau 0.0"),
        ({"con_g_weight": -1.0}, "--con-g-weight"),
        ({"con_d_weight": float("nan")}, "--con-d-weight"),
    ],
)
def test_config_errors_name_the_flag(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **overrides).validate()


# --- CLI ----------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from cli.pipeline import app as pipeline_app

    root = tmp_path_factory.mktemp("gan-cache")
    for args in (
        ["synth", "--out", root / "w", "--n", 16, "--shard-size", 8, "--n-captions", 40, "--image-size", 32],
        [
            "embed",
            f"{root / 'w'}/*.tar",
            "--cache",
            root / "c",
            "--clip-model",
            TINY_CLIP,
            "--clip-pretrained",
            "",
            "--image-size",
            32,
            "--workers",
            0,
        ],
    ):
        result = runner.invoke(pipeline_app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return root / "c"


def _user_error(args, message):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_cli_trains_then_resumes_from_the_real_cache(cache, tmp_path):
    args = [
        "gan",
        "--cache",
        cache,
        "--out",
        tmp_path,
        "--name",
        "cli",
        "--size",
        "tiny",
        "--condition",
        "perturb",
        "--steps",
        2,
        "--batch-size",
        4,
        "--sample-every",
        1,
        "--checkpoint-every",
        1,
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    run = tmp_path / "000-cli"
    assert "gan: step 2" in result.output and str(run / "0000002.pt") in result.output
    assert {"0000001.pt", "0000002.pt", "samples-0000002.png", "config.json"} <= {
        p.name for p in run.iterdir()
    }
    again = runner.invoke(app, ["gan", "--resume", str(run), "--steps", "3"])
    assert again.exit_code == 0, again.output
    assert (run / "0000003.pt").is_file() and not (tmp_path / "001-cli").exists()
    done = runner.invoke(app, ["gan", "--resume", str(run), "--steps", "3"])
    assert done.exit_code == 0 and "already at step 3" in done.output


def test_resume_and_sample_survive_a_damaged_config_json_and_a_half_written_metrics_line(cache, tmp_path):
    args = ["gan", "--cache", cache, "--out", tmp_path, "--size", "tiny", "--condition", "perturb"]
    args += ["--steps", 1, "--batch-size", 4, "--sample-every", 0, "--device", "cpu"]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    run = tmp_path / "000-gan"
    config = run / "config.json"
    config.write_bytes(b"\xff" + config.read_bytes()[1:])  # bit rot: config.json is only ever written
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss_g": 1.')  # a run killed in the middle of a line
    sample = runner.invoke(app, ["sample", "--checkpoint", str(run), "--prompt", "a red circle", "--n", "1"]
                           + ["--out", str(tmp_path / "s.png"), "--device", "cpu"])  # fmt: skip
    assert sample.exit_code == 0, sample.output
    with pytest.warns(UserWarning, match="metrics.jsonl: dropped 1 unreadable line"):
        resumed = runner.invoke(app, ["gan", "--resume", str(run), "--steps", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(config.read_text())["steps"] == 2  # rewritten whole by the resumed run
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_cli_dry_run_prints_the_config(cache, tmp_path):
    result = runner.invoke(app, ["gan", "--cache", str(cache), "--size", "tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["size"] == "tiny" and json.loads(result.stdout)["allow_partial"] is False
    partial = runner.invoke(app, ["gan", "--cache", str(cache), "--allow-partial", "--dry-run"])
    assert json.loads(partial.stdout)["allow_partial"] is True
    loss_args = ["--con-g-weight", "3", "--con-d-weight", "1", "--tau", "0.2"]
    weights = json.loads(runner.invoke(app, ["gan", "--cache", str(cache), *loss_args, "--dry-run"]).stdout)
    assert (weights["con_g_weight"], weights["con_d_weight"], weights["tau"]) == (3.0, 1.0, 0.2)


def test_cli_errors_are_one_line(cache, tmp_path):
    _user_error(
        ["gan", "--cache", tmp_path / "nope", "--out", tmp_path, "--size", "tiny"], "no such directory"
    )
    _user_error(["gan", "--cache", cache, "--out", tmp_path, "--size", "huge"], "--size huge")
    _user_error(
        [
            "gan",
            "--cache",
            cache,
            "--out",
            tmp_path,
            "--condition",
            "optimize",
            "--size",
            "tiny",
            "--device",
            "cpu",
        ],
        "--condition optimize needs the optimize stage",
    )
    _user_error(["gan", "--resume", tmp_path / "missing.pt"], "--resume")
    assert not list(tmp_path.glob("0*-gan"))  # a refused run leaves no run directory behind


def cli_gan_args(cache, out, steps: int) -> list[str]:
    args = ["gan", "--cache", cache, "--out", out, "--size", "tiny", "--condition", "perturb"]
    args += ["--steps", steps, "--batch-size", 4, "--sample-every", 0, "--checkpoint-every", 2]
    return [str(a) for a in [*args, "--log-every", 1, "--device", "cpu"]]


@pytest.mark.parametrize(
    ("stop", "masked", "said"),
    [
        (0, False, "no checkpoint was written yet; the run folder {run} held no step's work and was removed"),
        (1, False, "no checkpoint was written yet; the run folder {run} keeps its metrics so far"),
        (3, False, "the last checkpoint is {run}/0000002.pt (step 2)"),
        (3, True, "the last checkpoint is {run}/0000002.pt (step 2)"),  # torch.save broken mid-write
    ],
)
def test_ctrl_c_says_in_one_line_what_a_run_can_continue_from(
    cache, tmp_path, monkeypatch, stop, masked, said
):
    step = GanTrainer.train_step

    def train_step(self, batch):
        if self.step != stop:
            return step(self, batch)
        if not masked:
            raise KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 928256 vs 928144") from None  # its zip writer's __exit__

    monkeypatch.setattr(GanTrainer, "train_step", train_step)
    result = runner.invoke(app, cli_gan_args(cache, tmp_path, 5))
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    said = "interrupted: " + said.format(run=tmp_path / "000-gan")
    assert [line for line in result.stderr.splitlines() if "interrupted" in line] == [said]
    assert (tmp_path / "000-gan").exists() == (stop > 0)


def test_sigint_exits_130_with_one_line_naming_the_last_checkpoint(cache, tmp_path):
    """A real SIGINT to `trainers gan`, resumed from step 2 to a far --steps with no checkpoint before it,
    so 0000002.pt is the last checkpoint whenever the signal lands."""
    assert runner.invoke(app, cli_gan_args(cache, tmp_path, 2)).exit_code == 0
    run = tmp_path / "000-gan"
    args = ["gan", "--resume", str(run), "--steps", "100000", "--checkpoint-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainers", *args], stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 120
    while (run / "metrics.jsonl").read_text().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # until a step after the resume is done
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        f"interrupted: the last checkpoint is {run / '0000002.pt'} (step 2)"
    ]
    assert "Traceback" not in err and list_checkpoints(run) == [run / "0000002.pt"]


def test_a_cache_larger_than_the_size_is_meant_for_is_warned_about(tmp_path):
    with pytest.warns(
        UserWarning,
        match="--size tiny is meant for 32 px images; the cache's are 64 px, so each "
        "step costs about 4x more",
    ):
        run_gan(tiny_config(tmp_path, steps=1), fake_source(resolution=64), progress=False)
