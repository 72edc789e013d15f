"""`trainers ldm`: train the DiT-style flow model (`trainers/families/ldm/model.py`) on a frozen `trainers
vae`'s latents, or on the pixels with `--space pixel` (the identity in place of the VAE:
trainers/families/ldm/space.py).

One step, on a batch of real images x with conditions h (unit-norm text-space features):

    z0 = latent_scale * VAE.encode(x).mean                 frozen, no grad
    t ~ logit-normal, eps ~ N(0, I), drop ~ Bernoulli(cond_drop)
    loss = | Dit((1 - t) z0 + t eps, t, h or null) - (eps - z0) |^2
    EMA <- lerp(model, EMA, decay)

`latent_scale` is 1 / std of the first batch's latents (Stable Diffusion's scale_factor, measured rather
than fixed, since our VAEs differ per run); it is part of the architecture and kept by resume and --init.
The posterior mean is used, not a sample: the KL weight is tiny, so the posterior variance is ~0 anyway.
When `trainers vae --cache C --encode VAE` has precomputed this VAE's latents
(`trainers/autoencoders/vae/encode.py`), they are looked up by key instead (the same numbers); images without
one are encoded on the fly.

Few-shot: `--init CKPT` starts from another `trainers ldm` checkpoint's weights (model and EMA; a fresh
optimiser, step 0) of the same architecture, and `--condition caption --paired-limit N` trains on N
real image-caption pairs (with another condition, those N images keep their captions and the rest get the
condition: semi-supervised). config.json's `data.pairs` / `data.pairs_digest` record them and the run's
pairs.txt lists their keys (`trainers.runtime.runs.write_pairs`).

bf16 autocast on CUDA only. Resume is bit-for-bit on the CPU, as `trainers gan`: the checkpoint holds
model, EMA, optimiser and every global RNG state, and the loader restarts at `start_step`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from trainers.data.loader import cache_loader_config
from trainers.engine import loop
from trainers.families.ldm.config import RESUME_OVERRIDABLE, LdmConfig
from trainers.families.ldm.model import Dit, flow_loss, ldm_architecture, sample_euler
from trainers.runtime.checkpoints import require_same_arch
from trainers.runtime.distributed import SINGLE, World
from trainers.runtime.runs import resolve_run_config, seed_everything, select_device


def resolve_config(values: dict[str, Any], resume: Path | str | None = None) -> tuple[LdmConfig, dict | None]:
    """CLI values -> config, or the resumed checkpoint's with the allowed overrides
    (trainers.runtime.runs)."""
    return resolve_run_config(LdmConfig, "ldm", RESUME_OVERRIDABLE, values, resume)


class LdmTrainer:
    """Model, EMA, optimiser, frozen VAE and one training step; no files, no loader."""

    def __init__(
        self, config: LdmConfig, arch: dict, vae: torch.nn.Module, device: torch.device, world: World = SINGLE
    ):
        self.config, self.arch, self.device, self.world = config, arch, device, world
        self.model = Dit(arch).to(device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.forward = loop.compiled(self.model, config.compile)  # the training step's
        self.vae = vae.to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate, weight_decay=0.0)
        self.amp = device.type == "cuda"
        self.step = 0
        self.latent_cache = (
            None  # trainers.autoencoders.vae.encode.LatentCache of this VAE (`trainers vae --encode`), if any
        )

    def autocast(self):
        return loop.bf16_autocast(self.amp)

    @torch.no_grad()
    def latents(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> scaled posterior means [B, 4, R/4, R/4], fp32; the cached latents of
        `keys` where `latent_cache` has them (the same numbers), the rest encoded now."""
        from trainers.autoencoders.vae.encode import posterior_means

        mean = posterior_means(self.vae, images, keys, self.latent_cache, self.device)
        return mean * self.arch["latent_scale"]

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        z0 = self.latents(batch["image"], batch.get("key"))  # [B, 4, r, r]
        h = batch["cond"].to(self.device, non_blocking=True).float()  # [B, D]
        with self.autocast():
            loss = flow_loss(self.forward, z0, h, self.config.cond_drop, self.world)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.world.average_gradients(self.model.parameters())
        self.opt.step()
        self.step += 1
        loop.update_ema(self.ema, self.model, self.step, self.config.ema_decay)
        return {"loss": loss.detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if not weights_only:
            self.opt.load_state_dict(state["opt"])


INIT_HINT = "use a checkpoint trained with the same --size, VAE latent shape and CLIP dim"
ARCH_KEYS_CHECKED_BY_INIT = (
    "size",
    "depth",
    "width",
    "heads",
    "patch",
    "latent_channels",
    "latent_size",
    "h_dim",
)


@dataclass
class LdmResult:
    run_dir: Path
    step: int  # steps done in total (including those before a resume)
    checkpoint: Path | None  # the last checkpoint written
    losses: dict[str, float]  # of the last logged step
    images_per_s: float
    data: dict[str, Any]  # what the loader used: LoaderInfo.record() and pairs
    samples: list[Path] = field(default_factory=list)  # sample grids written


def run_ldm(config: LdmConfig, resume_state: dict | None = None, progress: Any = None) -> LdmResult:
    """Train (or continue) a run; checkpoints, config.json and metrics.jsonl in its dir. Under torchrun,
    data-parallel (trainers/runtime/distributed.py): rank 0 writes, and returns the result."""
    config = config.with_learning_rate()  # recorded as the number it trains with
    return loop.launch(config, functools.partial(_run_ldm, config, resume_state), progress)


def _run_ldm(config, resume_state, world: World, device_name: str, progress) -> LdmResult:
    from feature_cache.embed_rows import cache_clip
    from trainers.autoencoders.vae.encode import load_latent_cache, posterior_means
    from trainers.data.loader import make_loader
    from trainers.families.ldm.space import downsampling, load_space

    device = select_device(device_name)
    resume = loop.load_resume(config, "ldm", resume_state)
    if resume.finished(config.steps):
        return LdmResult(resume.path.parent, resume.step, resume.path, {}, 0.0, resume.state.get("data", {}))
    init_path, init_state = loop.load_init_state(config, "ldm")
    clip = cache_clip(config.cache)
    vae_path = resume.state["vae"]["path"] if resume.state is not None else config.vae
    vae, vae_ckpt = load_space(config.space, vae_path)
    latent_cache = None  # this VAE's `trainers vae --encode` latents; None: encode every batch on the fly
    if vae_ckpt["path"] is not None:
        latent_cache = load_latent_cache(config.cache, vae_ckpt["path"])
    batches = make_loader(cache_loader_config(config), start_step=resume.step, world=world)
    info = batches.info
    resolution = vae_ckpt["arch"]["resolution"] or info.image_size  # pixel space: any
    loop.check_autoencoder_fits(info, int(clip.dim), config.cache, f"--vae {vae_path}", resolution)
    data = info.record()
    latent_size = info.image_size // downsampling(config.space)
    if resume.state is None:
        first = next(batches)
        # the latent scale from the global first batch: every rank (and one process) gets the same
        mean = world.gather(posterior_means(vae, first["image"], first.get("key"), latent_cache))
        scale = 1.0 / max(float(mean.float().std()), 1e-6)
        channels = vae_ckpt["arch"]["latent_channels"]
        arch = ldm_architecture(config.size, channels, latent_size, info.dim, scale, config.space)
        batches = chain([first], batches)
        if init_state is not None:
            require_same_arch(init_path, init_state["arch"], arch, ARCH_KEYS_CHECKED_BY_INIT, INIT_HINT)
            arch = {**arch, "latent_scale": init_state["arch"]["latent_scale"]}  # its weights learnt with it
    else:
        arch = resume.state["arch"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    grid_h = loop.cache_prompt_grid(clip, device, config.prompts, config.samples_per_prompt)  # [P * n, D]
    seed_everything(config.seed)
    trainer = LdmTrainer(config, arch, vae, device, world)
    trainer.latent_cache = latent_cache
    loop.restore(trainer, resume, init_state, [trainer.model, trainer.ema], world)
    vae_args = {"path": vae_ckpt["path"], "step": int(vae_ckpt["step"]), "arch": vae_ckpt["arch"]}
    clip_args = loop.clip_record(clip)
    record = loop.checkpoint_record("ldm", config, arch=arch, clip=clip_args, vae=vae_args, data=data)
    run_dir = None
    if world.main:  # the other ranks train in step and write nothing
        run_dir = loop.open_run(config, resume, info.pair_keys)
        run_record = {"arch": arch, "clip": clip_args, "vae_ckpt": vae_args, "data": data}
        loop.write_config(run_dir, "ldm", config, **run_record, latents=loop.derived_record(latent_cache))

    def draw() -> torch.Tensor:
        # a private generator for the noise: writing a grid does not move the training RNG
        noise = torch.randn(
            (len(grid_h), arch["latent_channels"], arch["latent_size"], arch["latent_size"]),
            generator=torch.Generator().manual_seed(config.seed),
        ).to(device)  # [P * n, C, r, r]
        with trainer.autocast():
            z = sample_euler(trainer.ema, noise, grid_h, config.sample_steps, config.guidance)
            decoded = trainer.vae.decode(z.float() / arch["latent_scale"]).float()  # [P * n, 3, R, R]
        return ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    grid = loop.SampleGrid(draw, list(config.prompts), config.samples_per_prompt, config.sample_every)
    advance = loop.step_counter(progress)
    trained = loop.train_steps(trainer, batches, config, run_dir, record, grid=grid, advance=advance)
    return LdmResult(run_dir, data=data, **vars(trained))
