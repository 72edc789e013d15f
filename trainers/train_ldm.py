"""`trainers ldm`: train the DiT-style latent flow model (`trainers/ldm.py`) on a frozen `trainers vae`.

One step, on a batch of real images x with conditions h (unit-norm text-space features):

    z0 = latent_scale * VAE.encode(x).mean                 frozen, no grad
    t ~ logit-normal, eps ~ N(0, I), drop ~ Bernoulli(cond_drop)
    loss = | Dit((1 - t) z0 + t eps, t, h or null) - (eps - z0) |^2
    EMA <- lerp(model, EMA, decay)

`latent_scale` is 1 / std of the first batch's latents (Stable Diffusion's scale_factor, measured rather
than fixed, since our VAEs differ per run); it is part of the architecture and kept by resume and --init.
The posterior mean is used, not a sample: the KL weight is tiny, so the posterior variance is ~0 anyway.
When `trainers vae --cache C --encode VAE` has precomputed this VAE's latents (`trainers/latents.py`),
they are looked up by key instead (the same numbers); images without one are encoded on the fly.

Few-shot: `--init CKPT` starts from another `trainers ldm` checkpoint's weights (model and EMA; a fresh
optimiser, step 0) of the same architecture, and `--condition caption --paired-limit N` trains on N
real image-caption pairs (with another condition, those N images keep their captions and the rest get the
condition: semi-supervised). config.json's `data.pairs` / `data.pairs_digest` record them and the run's
pairs.txt lists their keys (`trainers.runs.write_pairs`).

bf16 autocast on CUDA only. Resume is bit-for-bit on the CPU, as `trainers gan`: the checkpoint holds
model, EMA, optimiser and every global RNG state, and the loader restarts at `start_step`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError, require_at_least
from trainers.checkpoints import (
    load_checkpoint,
    load_init,
    require_same_arch,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from trainers.distributed import SINGLE, World, close_world, init_world
from trainers.ldm import LDM_SIZES, Dit, flow_loss, ldm_architecture, sample_euler
from trainers.runs import (
    DEFAULT_PROMPTS,
    RunConfig,
    check_run_name,
    log_metrics,
    new_run_dir,
    resolve_run_config,
    seed_everything,
    select_device,
    trim_metrics,
    write_pairs,
    write_run_config,
)


@dataclass(frozen=True)
class LdmConfig(RunConfig):
    cache: Path | None = None  # feature cache (read-only); on --resume the checkpoint's unless given
    vae: Path | None = None  # `trainers vae` checkpoint (or run dir: its latest), frozen
    out: Path = Path("runs")  # the run goes to OUT/{idx:03d}-{name}/
    name: str = "ldm"  # run name (a folder name)
    size: str = "S"  # LDM_SIZES entry: tiny (tests), S, B
    condition: str = "optimize"  # conditioning source: optimize, retrieve, perturb, caption
    steps: int = 50_000  # total optimisation steps; a resumed run continues up to this
    batch_size: int = 64  # images per step
    lr: float = 1e-4  # AdamW learning rate (DiT's, no weight decay)
    seed: int = 0  # init, t, noise, condition dropout and data order
    paired_limit: int | None = None  # few-shot: N real pairs (only them with caption, else mixed in)
    allow_partial: bool = False  # train on the usable shards of a partial cache (see LoaderConfig)
    init: Path | None = None  # start from this `trainers ldm` checkpoint's weights (same architecture)
    cond_drop: float = 0.1  # share of samples trained with the null condition (for guidance)
    ema_decay: float = 0.9999  # EMA decay per step (warmed up: min(decay, (1 + step) / (10 + step)))
    guidance: float = 3.0  # default guidance scale recorded for sampling
    workers: int = 0  # loader processes
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    checkpoint_every: int = 5000  # steps between checkpoints, 0 for the final one only
    log_every: int = 10  # steps between metrics.jsonl lines
    sample_every: int = 1000  # steps between sample grids (EMA model, `guidance`), 0 for the final one only
    sample_steps: int = 25  # Euler steps of the grids
    samples_per_prompt: int = 4  # grid columns; rows are trainers.runs.DEFAULT_PROMPTS
    resume: Path | None = None  # checkpoint file or run directory (latest checkpoint) to continue

    def validate(self) -> None:
        from trainers.conditions import check_condition

        if self.size not in LDM_SIZES:
            raise ConfigError(f"--size {self.size}: choose one of {', '.join(LDM_SIZES)}")
        check_condition(self.condition)
        check_run_name(self.name)
        require_at_least(
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--seed", self.seed, 0),
            ("--workers", self.workers, 0),
            ("--checkpoint-every", self.checkpoint_every, 0),
            ("--log-every", self.log_every, 1),
            ("--sample-every", self.sample_every, 0),
            ("sample_steps", self.sample_steps, 1),
            ("samples_per_prompt", self.samples_per_prompt, 1),
        )
        if self.paired_limit is not None and self.paired_limit < 1:
            raise ConfigError("--paired-limit must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("--lr must be a positive number")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ConfigError("--cond-drop must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay must be in [0, 1)")
        if self.cache is None:
            raise ConfigError("--cache is required: the feature cache made by `pipeline embed` (or --resume)")
        if self.vae is None:
            raise ConfigError("--vae is required: a `trainers vae` checkpoint or run directory")
        if self.init is not None and self.resume is not None:
            raise ConfigError("--init starts a new run from weights; --resume continues one: give one")


RESUME_OVERRIDABLE = (
    "cache",
    "allow_partial",
    "steps",
    "checkpoint_every",
    "log_every",
    "device",
    "workers",
    "guidance",
    "sample_every",
    "sample_steps",
    "samples_per_prompt",
)


def resolve_config(values: dict[str, Any], resume: Path | str | None = None) -> tuple[LdmConfig, dict | None]:
    """CLI values -> config, or the resumed checkpoint's with the allowed overrides (trainers.runs)."""
    return resolve_run_config(LdmConfig, "ldm", RESUME_OVERRIDABLE, values, resume)


class LdmTrainer:
    """Model, EMA, optimiser, frozen VAE and one training step; no files, no loader."""

    def __init__(
        self, config: LdmConfig, arch: dict, vae: torch.nn.Module, device: torch.device, world: World = SINGLE
    ):
        self.config, self.arch, self.device, self.world = config, arch, device, world
        self.model = Dit(arch).to(device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.vae = vae.to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.amp = device.type == "cuda"
        self.step = 0
        self.latent_cache = None  # trainers.latents.LatentCache of this VAE (`trainers vae --encode`), if any

    def autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def latents(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> scaled posterior means [B, 4, R/4, R/4], fp32; the cached latents of
        `keys` where `latent_cache` has them (the same numbers), the rest encoded now."""
        from trainers.latents import posterior_means

        mean = posterior_means(self.vae, images, keys, self.latent_cache, self.device)
        return mean * self.arch["latent_scale"]

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        z0 = self.latents(batch["image"], batch.get("key"))  # [B, 4, r, r]
        h = batch["cond"].to(self.device, non_blocking=True).float()  # [B, D]
        with self.autocast():
            loss = flow_loss(self.model, z0, h, self.config.cond_drop, self.world)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.world.average_gradients(self.model.parameters())
        self.opt.step()
        self.step += 1
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1.0 - decay)
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
    data-parallel (trainers/distributed.py): rank 0 writes, and returns the result."""
    config.validate()
    world, device = init_world(config.device)
    try:
        world.local_batch(config.batch_size)
        return _run_ldm(config, resume_state, progress if world.main else None, world, device)
    finally:
        close_world(world)


def _run_ldm(config, resume_state, progress, world: World, device_name: str) -> LdmResult:
    from trainers.data import LoaderConfig, make_loader
    from trainers.embed_rows import cache_clip
    from trainers.latents import load_latent_cache, posterior_means
    from trainers.vae import load_vae

    device = select_device(device_name)
    if config.resume is not None:
        resume_path = resolve_checkpoint(config.resume, "--resume")
        resume_state = resume_state or load_checkpoint(resume_path, "--resume")
        if int(resume_state["step"]) >= config.steps:
            return LdmResult(
                resume_path.parent,
                int(resume_state["step"]),
                resume_path,
                {},
                0.0,
                resume_state.get("data", {}),
            )
    init_path, init_state = load_init(config.init, "ldm") if config.init is not None else (None, None)
    clip = cache_clip(config.cache)
    vae_path = resume_state["vae"]["path"] if resume_state is not None else config.vae
    vae, vae_ckpt = load_vae(vae_path, "--vae")
    latent_cache = load_latent_cache(config.cache, vae_ckpt["path"])  # None: encode every batch on the fly
    loader_config = LoaderConfig(
        cache=Path(config.cache),
        condition=config.condition,
        batch_size=config.batch_size,
        seed=config.seed,
        workers=config.workers,
        paired_limit=config.paired_limit,
        allow_partial=config.allow_partial,
    )
    start_step = 0 if resume_state is None else int(resume_state["step"])
    batches = make_loader(loader_config, start_step=start_step, world=world)
    info = batches.info
    if info.image_size != vae_ckpt["arch"]["resolution"]:
        raise ConfigError(
            f"--vae {vae_path}: trained on {vae_ckpt['arch']['resolution']}px images, the cache has "
            f"{info.image_size}px ones"
        )
    if info.dim != int(clip.dim):
        raise ConfigError(f"--cache {config.cache}: conditions are {info.dim}-d but its CLIP is {clip.dim}-d")
    data = info.record()
    latent_size = info.image_size // 4
    if resume_state is None:
        first = next(batches)
        # the latent scale from the global first batch: every rank (and one process) gets the same
        mean = world.gather(posterior_means(vae, first["image"], first.get("key"), latent_cache))
        scale = 1.0 / max(float(mean.float().std()), 1e-6)
        arch = ldm_architecture(
            config.size, vae_ckpt["arch"]["latent_channels"], latent_size, info.dim, scale
        )
        batches = chain([first], batches)
        if init_state is not None:
            require_same_arch(init_path, init_state["arch"], arch, ARCH_KEYS_CHECKED_BY_INIT, INIT_HINT)
            arch = {**arch, "latent_scale": init_state["arch"]["latent_scale"]}  # its weights learnt with it
    else:
        arch = resume_state["arch"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    from pipeline.clip import encode_texts, load_clip
    from trainers.sample import write_grid

    text_clip = load_clip(clip.clip_model, clip.clip_pretrained or None, str(device))  # seeds torch: first
    prompt_h = encode_texts(text_clip, list(DEFAULT_PROMPTS)).clone()  # [P, D]; clone: out of inference mode
    grid_h = prompt_h.repeat_interleave(config.samples_per_prompt, dim=0)  # [P * n, D]
    del text_clip
    seed_everything(config.seed)
    trainer = LdmTrainer(config, arch, vae, device, world)
    trainer.latent_cache = latent_cache
    clip_args = {"model": clip.clip_model, "pretrained": clip.clip_pretrained, "dim": int(clip.dim)}
    if resume_state is None:
        if init_state is not None:
            trainer.load_state_dict(init_state, weights_only=True)
    else:
        trainer.load_state_dict(resume_state)
        trainer.step = start_step
        restore_rng(resume_state["rng"])
    world.broadcast([trainer.model, trainer.ema])
    if not world.main:  # the other ranks train in step and write nothing
        for _ in range(start_step, config.steps):
            trainer.train_step(next(batches))
        return LdmResult(None, config.steps, None, {}, 0.0, data)
    if resume_state is None:
        run_dir = new_run_dir(config.out, config.name)
        write_pairs(run_dir, info.pair_keys)
    else:
        run_dir = resume_path.parent
        trim_metrics(run_dir / "metrics.jsonl", start_step)
    vae_args = {"path": vae_ckpt["path"], "step": int(vae_ckpt["step"]), "arch": vae_ckpt["arch"]}
    write_run_config(
        run_dir,
        {
            "kind": "ldm",
            **config.to_dict(),
            "arch": arch,
            "clip": clip_args,
            "vae_ckpt": vae_args,
            "data": data,
            "latents": {
                "stage": latent_cache.stage if latent_cache else None,
                "cached": len(latent_cache) if latent_cache else 0,
            },
        },
    )
    result = LdmResult(run_dir, start_step, None, {}, 0.0, data)
    t0, images = time.perf_counter(), 0
    with open(run_dir / "metrics.jsonl", "a") as log:
        for step in range(start_step, config.steps):
            batch = next(batches)
            losses = trainer.train_step(batch)
            done, images = step + 1, images + batch["image"].shape[0] * world.size
            last = done == config.steps
            if done % config.log_every == 0 or last:
                result.images_per_s = images / (time.perf_counter() - t0)
                result.losses = log_metrics(log, done, losses, images_per_s=result.images_per_s)
            if progress is not None:
                progress(1)
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or last:
                state = {
                    "kind": "ldm",
                    "config": config.to_dict(),
                    "arch": arch,
                    "clip": clip_args,
                    "vae": vae_args,
                    "data": data,
                    **trainer.state_dict(),
                }
                result.checkpoint = save_checkpoint(run_dir, done, state)
            if (config.sample_every and done % config.sample_every == 0) or last:
                # a private generator for the noise: writing a grid does not move the training RNG
                noise = torch.randn(
                    (len(grid_h), arch["latent_channels"], arch["latent_size"], arch["latent_size"]),
                    generator=torch.Generator().manual_seed(config.seed),
                ).to(device)  # [P * n, C, r, r]
                with trainer.autocast():
                    z = sample_euler(trainer.ema, noise, grid_h, config.sample_steps, config.guidance)
                    decoded = trainer.vae.decode(z.float() / arch["latent_scale"]).float()  # [P * n, 3, R, R]
                images_u8 = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
                path = run_dir / f"samples-{done:07d}.png"
                write_grid(path, images_u8, list(DEFAULT_PROMPTS), config.samples_per_prompt)
                result.samples.append(path)
            result.step = done
    return result
