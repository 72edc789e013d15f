"""`trainers gan`: train the LAFITE-style conditional GAN (`trainers/families/gan/model.py`) from the feature
cache.

One step, on a batch of real images x with conditions h (pseudo text features, unit norm):

    fake = G(z, h)                                                   one G forward serves both phases
    D:  softplus(D(fake)) + softplus(-D(x)) + w_D * InfoNCE(f_s(x), h)          (+ lazy R1 on x)
    G:  softplus(-D(fake)) + w_G * InfoNCE(CLIP(aug(fake)), h) + w_D * InfoNCE(f_s(fake), h)
    G_ema <- lerp(G, G_ema, beta)

L_ConG uses the cache's CLIP (frozen; gradients flow through it to G) on random crops resized to CLIP's
input size with CLIP's own normalisation. As in LAFITE, the D-feature contrastive term also appears in G's
loss on fakes. bf16 autocast on CUDA only; the R1 pass runs in fp32. Resume is bit-for-bit on the CPU:
the checkpoint holds models, EMA, optimisers and every global RNG state, and the loader restarts at
`start_step` (sampling draws from its own generator, so writing a grid does not move the RNG).

Few-shot, as `trainers ldm`: `--init CKPT` starts from another `trainers gan` checkpoint's G, D and EMA
(fresh optimisers, step 0, the same architecture), and `--paired-limit N` gives N real pairs (with
`--condition caption`: trains on them alone; otherwise they are mixed in); pairs.txt lists their keys.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from manifests.faults import crash_point
from trainers.engine import loop
from trainers.families.gan.config import RESUME_OVERRIDABLE, GanConfig
from trainers.families.gan.model import architecture, build_models, check_size_fits
from trainers.families.gan.source import DataSource, cache_source, data_record, first_batch_shape
from trainers.runtime.checkpoints import require_same_arch
from trainers.runtime.distributed import SINGLE, World
from trainers.runtime.runs import resolve_run_config, seed_everything, select_device


def read_prompts(path: Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--prompts {path}: cannot read it ({e.strerror})") from None
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def resolve_config(values: dict[str, Any], resume: Path | str | None = None) -> tuple[GanConfig, dict | None]:
    """CLI values -> config, or the resumed checkpoint's with the allowed overrides
    (trainers.runtime.runs)."""
    return resolve_run_config(GanConfig, "gan", RESUME_OVERRIDABLE, values, resume)


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float, world: World = SINGLE) -> torch.Tensor:
    """Symmetric InfoNCE between rows of a and b [B, D], cosine similarity, fp32. Plain torch rather than
    kernels.contrastive_loss: one batch's B x B logits are tiny, so the fused kernel would buy nothing.
    Under torchrun, over the gathered global batch (trainers.runtime.distributed: the one-process loss, the
    same
    on every rank; backpropagate it `world.coupled`)."""
    a = F.normalize(world.gather(a).float(), dim=1)  # [B, D]
    b = F.normalize(world.gather(b).float(), dim=1)  # [B, D]
    logits = a @ b.T / tau  # [B, B]
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class GanTrainer:
    """Models, optimisers and one training step; no files, no loader (the benchmark drives it too)."""

    def __init__(self, config: GanConfig, arch: dict, clip: Any, device: torch.device, world: World = SINGLE):
        self.config, self.arch, self.clip, self.device, self.world = config, arch, clip, device, world
        self.G, self.D = (m.to(device) for m in build_models(arch))
        # the training step's G (D stays eager: R1's double backward is not compilable)
        self.G_forward = loop.compiled(self.G, config.compile)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_G = torch.optim.Adam(
            self.G.parameters(), lr=config.learning_rate, betas=(0.0, 0.99), eps=1e-8
        )
        # Lazy R1 (StyleGAN2): D's Adam sees the regulariser every r1_every steps, so its lr and beta2
        # are rescaled as if the regulariser were applied every step.
        ratio = config.r1_every / (config.r1_every + 1)
        self.opt_D = torch.optim.Adam(
            self.D.parameters(), lr=config.learning_rate * ratio, betas=(0.0, 0.99**ratio), eps=1e-8
        )
        self.r1_gamma = config.r1_gamma if config.r1_gamma is not None else default_r1_gamma(arch, config)
        self.clip_mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)
        self.amp = device.type == "cuda"
        self.step = 0

    def autocast(self, enabled: bool = True):
        return loop.bf16_autocast(self.amp and enabled)

    def clip_features(self, img: torch.Tensor) -> torch.Tensor:
        """CLIP image features of generated images, differentiable w.r.t. the images: a random crop of
        80-100% of the side per image, resized to CLIP's input, with CLIP's normalisation."""
        b, size, part = img.shape[0], self.clip.image_size, self.world.part
        x = (img.float() + 1) / 2  # [B, 3, R, R] in about [0, 1]
        n = b * self.world.size  # crops drawn for the global batch, this rank's kept
        scale = part(torch.empty(n, device=img.device).uniform_(0.8, 1.0))  # [B] crop side / image side
        shift = (part(torch.rand(n, 2, device=img.device)) * 2 - 1) * (1 - scale)[:, None]  # [B, 2] inside
        theta = torch.zeros(b, 2, 3, device=img.device)  # [B, 2, 3] affine: scale + shift
        theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)  # [B, S, S, 2]
        # [B, 3, S, S]: each crop resampled to CLIP's input size
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (x - self.clip_mean) / self.clip_std
        return self.clip.model.encode_image(x)  # [B, D]

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One D update then one G update; returns detached scalar losses (no host sync)."""
        cfg = self.config
        real = batch["image"].to(self.device, non_blocking=True).float()  # [B, 3, R, R] in [-1, 1]
        h = batch["cond"].to(self.device, non_blocking=True).float()  # [B, D] unit norm
        b, world = real.shape[0], self.world  # b: this rank's rows of the global batch
        do_r1 = self.r1_gamma > 0 and self.step % cfg.r1_every == 0
        z = world.part(torch.randn(b * world.size, self.G.size.z_dim, device=self.device))  # [B, z_dim]
        with self.autocast():
            fake = self.G_forward(z, h, world=world)  # [B, 3, R, R]; D sees it detached, G's through it

        # Discriminator: logistic loss, L_ConD on reals, lazy R1 (its pass in fp32: a double backward).
        self.D.requires_grad_(True)
        real_in = real.detach().requires_grad_(do_r1)
        with self.autocast():
            logits_fake, _ = self.D(fake.detach(), h)  # [B]
        with self.autocast(enabled=not do_r1):
            logits_real, f_real = self.D(real_in, h)  # [B], [B, D]
        loss_adv_d = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
        loss_con_d = info_nce(f_real, h, cfg.tau, world)
        # loss_d as one process has it (logged); under torchrun the contrastive term, of the gathered
        # batch, is backpropagated `coupled` (trainers.runtime.distributed)
        loss_d = loss_adv_d + cfg.con_d_weight * loss_con_d
        grad_d = loss_adv_d + cfg.con_d_weight * world.coupled(loss_con_d) if world.distributed else loss_d
        r1 = torch.zeros((), device=self.device)
        if do_r1:
            (grad,) = torch.autograd.grad(logits_real.sum(), real_in, create_graph=True)  # [B, 3, R, R]
            r1 = grad.square().sum(dim=[1, 2, 3]).mean()
            r1_term = r1 * (self.r1_gamma / 2) * cfg.r1_every
            loss_d, grad_d = loss_d + r1_term, grad_d + r1_term
        self.opt_D.zero_grad(set_to_none=True)
        grad_d.backward()
        world.average_gradients(self.D.parameters())
        self.opt_D.step()

        # Generator: non-saturating loss, L_ConG through the frozen CLIP, L_ConD on fakes.
        self.D.requires_grad_(False)
        with self.autocast():
            logits_gen, f_fake = self.D(fake, h)  # [B], [B, D]
            clip_fake = self.clip_features(fake)  # [B, D]
        loss_adv_g = F.softplus(-logits_gen).mean()
        loss_con_g = info_nce(clip_fake, h, cfg.tau, world)
        loss_con_d_fake = info_nce(f_fake, h, cfg.tau, world)
        loss_g = loss_adv_g + cfg.con_g_weight * loss_con_g + cfg.con_d_weight * loss_con_d_fake
        grad_g = loss_g
        if world.distributed:
            con_g, con_d_fake = world.coupled(loss_con_g), world.coupled(loss_con_d_fake)
            grad_g = loss_adv_g + cfg.con_g_weight * con_g + cfg.con_d_weight * con_d_fake
        self.opt_G.zero_grad(set_to_none=True)
        grad_g.backward()
        world.average_gradients(self.G.parameters())
        self.opt_G.step()
        self.D.requires_grad_(True)

        self.step += 1
        self.update_ema(b * world.size)
        crash_point(f"train:rank{world.rank}:step{self.step}")  # tests: a rank dying mid-run
        # this rank's rows' values (the contrastive ones the global batch's): trainers.engine.loop averages
        # them
        losses = {
            "loss_g": loss_g,
            "loss_d": loss_d,
            "adv_g": loss_adv_g,
            "adv_d": loss_adv_d,
            "con_g": loss_con_g,
            "con_d": loss_con_d,
            "con_d_fake": loss_con_d_fake,
        }
        if do_r1:
            losses["r1"] = r1
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def update_ema(self, batch_size: int) -> None:
        cfg = self.config
        ema_nimg = cfg.ema_kimg * 1000
        if cfg.ema_rampup:
            ema_nimg = min(ema_nimg, self.step * batch_size * cfg.ema_rampup)
        beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
        # One fused call instead of a lerp per tensor (base G has ~150 of them).
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1.0 - beta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False) -> None:
        """Everything, to resume; `weights_only`: the models and EMA alone (--init: fresh optimisers)."""
        for key, module in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema)):
            module.load_state_dict(state[key])
        if not weights_only:
            self.opt_G.load_state_dict(state["opt_G"])
            self.opt_D.load_state_dict(state["opt_D"])


def default_r1_gamma(arch: dict, config: GanConfig) -> float:
    """StyleGAN2-ADA's `auto` config: 0.0002 * resolution^2 / batch (0.026 at 64 px, batch 32)."""
    return 0.0002 * arch["resolution"] ** 2 / config.batch_size


@dataclass
class GanResult:
    run_dir: Path
    step: int  # steps done in total (including those before a resume)
    checkpoint: Path | None  # the last checkpoint written
    losses: dict[str, float]  # of the last step
    images_per_s: float  # over this invocation's steps
    samples: list[Path]  # sample grids written


BAR_LOSSES = {"loss_g": "G", "loss_d": "D", "con_g": "cG", "con_d": "cD"}  # the bar's, in this order


def bar_losses(losses: dict[str, float]) -> str:
    """`G 1.23 D 0.567 cG 12.3 cD 4.56`: short, so the bar keeps 80 columns (metrics.jsonl has them all)."""
    return " ".join(f"{label} {losses[k]:.3g}" for k, label in BAR_LOSSES.items() if k in losses)


@contextlib.contextmanager
def _progress(total: int, start: int, enabled: bool | Callable[[int], None]):
    """The run's own bar (`core.progress`: live on a terminal, plain lines elsewhere), advanced with
    `advance(losses=)` per step; a callable `enabled` is called with 1 per step instead (a
    caller's bar)."""
    from core.progress import bar_columns, make_progress

    if callable(enabled):
        yield lambda **fields: enabled(1)
        return
    if not enabled:
        yield lambda **fields: None
        return
    with make_progress(*bar_columns("losses")) as bar:
        task = bar.add_task("gan", total=total, completed=start, losses="", unit="step")

        def advance(losses: dict[str, float] | None = None) -> None:
            fields = {"losses": bar_losses(losses)} if losses else {}
            bar.update(task, advance=1, **fields)

        yield advance


def run_gan(
    config: GanConfig,
    source: DataSource | None = None,
    resume_state: dict | None = None,
    progress: bool | Callable[[int], None] = True,
) -> GanResult:
    """Train (or continue) a run; checkpoints, sample grids, config.json and metrics.jsonl in its dir.
    `progress`: show the run's bar (True), nothing (False), or call `progress(1)` after every step.
    Under torchrun, data-parallel (trainers/runtime/distributed.py): rank 0 writes, and returns the result."""
    config = config.with_learning_rate()  # recorded as the number it trains with
    return loop.launch(config, functools.partial(_run_gan, config, source, resume_state), progress)


def _run_gan(config, source, resume_state, world: World, device_name: str, progress) -> GanResult:
    from core.clip import load_clip

    device = select_device(device_name)
    resume = loop.load_resume(config, "gan", resume_state)
    if resume.finished(config.steps):
        return GanResult(resume.path.parent, resume.step, resume.path, {}, 0.0, [])
    init_path, init_state = loop.load_init_state(config, "gan")
    source = source or cache_source(config, world)

    if resume.state is None:  # a new run: the first batch tells the resolution and condition size
        batches = source.batches(0)
        data, pair_keys = data_record(batches)
        first = next(batches)
        resolution, h_dim = first_batch_shape(first)
        loop.check_condition_dim(config.cache, h_dim, source.h_dim)
        arch = architecture(config.size, resolution, h_dim)
        if world.main:
            check_size_fits(config.size, resolution)
        if init_state is not None:
            hint = "use a checkpoint trained with the same --size on a cache of the same image size and CLIP"
            require_same_arch(init_path, init_state["arch"], arch, sorted(arch), hint)
        batches = chain([first], batches)
        if config.r1_gamma is None:
            config = replace(config, r1_gamma=default_r1_gamma(arch, config))
    else:
        arch = resume.state["arch"]
        if source.h_dim != arch["h_dim"]:
            raise ConfigError(
                f"--cache {config.cache}: its features are {source.h_dim}-d, the checkpoint's "
                f"{arch['h_dim']}-d (resume with the cache the run was trained on)"
            )
    clip = load_clip(source.clip_model, source.clip_pretrained or None, str(device))  # seeds torch: first
    if clip.dim != arch["h_dim"]:
        raise ConfigError(
            f"--cache: the CLIP recorded in the cache is {clip.dim}-d but the features are {arch['h_dim']}-d"
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes every step
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    seed_everything(config.seed)
    trainer = GanTrainer(config, arch, clip, device, world)
    loop.restore(trainer, resume, init_state, [trainer.G, trainer.D, trainer.G_ema], world)
    if resume.state is not None:  # the loader made after the RNG is restored, at the step
        batches = source.batches(resume.step)
        data, pair_keys = data_record(batches)
    clip_args = {"model": source.clip_model, "pretrained": source.clip_pretrained, "dim": clip.dim}
    parts = {"arch": arch, "clip": clip_args, "data": data}
    run_dir, grid = None, None
    if world.main:  # the other ranks train in step and write nothing
        run_dir = loop.open_run(config, resume, pair_keys)
        loop.write_config(run_dir, "gan", config, **parts)
        grid_h = loop.prompt_grid(clip, config.prompts, config.samples_per_prompt)  # [P * n, D]

        def draw() -> torch.Tensor:
            return trainer.G_ema.sample(grid_h, seed=config.seed)  # [P * n, 3, R, R] uint8

        grid = loop.SampleGrid(draw, list(config.prompts), config.samples_per_prompt, config.sample_every)
    record = loop.checkpoint_record("gan", config, **parts)
    with _progress(config.steps, resume.step, progress) as advance:
        trained = loop.train_steps(trainer, batches, config, run_dir, record, grid=grid, advance=advance)
    return GanResult(run_dir, **vars(trained))
