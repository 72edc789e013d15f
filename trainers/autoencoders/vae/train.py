"""`trainers vae`: the trainer (model, optimisers and one step), the cache split into training and held-out
images, and the run (trainers/engine/loop.py). The model is trainers/autoencoders/vae/model.py."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from trainers.autoencoders.vae.config import VaeConfig
from trainers.autoencoders.vae.model import (
    AutoencoderKL,
    ClipPerceptual,
    PatchDiscriminator,
    kl_loss,
    reconstruct,
    vae_architecture,
)
from trainers.data.loader import cache_loader_config
from trainers.engine import loop
from trainers.runtime.distributed import SINGLE, World


class VaeTrainer:
    """Model, optimiser and one step; no files, no loader. `world`: the torchrun ranks sharing the step."""

    def __init__(self, config: VaeConfig, arch: dict, clip: Any, device: torch.device, world: World = SINGLE):
        self.config, self.arch, self.device, self.world = config, arch, device, world
        self.model = AutoencoderKL(arch).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))
        self.perceptual = ClipPerceptual(clip) if config.perceptual_weight > 0 else None
        self.disc = self.disc_opt = None
        if config.disc_weight > 0:
            self.disc = PatchDiscriminator(arch["channels"][1]).to(device)
            self.disc_opt = torch.optim.Adam(
                self.disc.parameters(), lr=config.learning_rate, betas=(0.5, 0.9)
            )
        self.step = 0  # steps taken; the adversarial terms start at config.disc_start

    @property
    def adversarial(self) -> bool:
        return self.disc is not None and self.step >= self.config.disc_start

    def losses(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The autoencoder's loss terms on x, and the reconstruction."""
        recon, mean, logvar = self.model(x, self.world)  # [B, 3, R, R], [B, 4, r, r] x 2
        cfg = self.config
        error = recon - x
        rec = error.square().mean() if cfg.recon_loss == "mse" else error.abs().mean()
        perc = self.perceptual(recon, x) if self.perceptual else torch.zeros((), device=x.device)
        kl = kl_loss(mean, logvar, x[0].numel())
        terms = {cfg.recon_loss: rec, "perceptual": perc, "kl": kl}
        total = rec + cfg.perceptual_weight * perc + cfg.kl_weight * kl
        if self.adversarial:
            self.disc.requires_grad_(False)  # the generator term trains the autoencoder only
            terms["g_adv"] = -self.disc(recon).mean()
            self.disc.requires_grad_(True)
            total = total + cfg.disc_weight * terms["g_adv"]
        return {"loss": total, **terms}, recon

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.device, non_blocking=True).float()  # [B, 3, R, R]
        losses, recon = self.losses(x)
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.world.average_gradients(self.model.parameters())
        self.opt.step()
        if self.adversarial:
            real, fake = self.disc(x), self.disc(recon.detach())
            losses["d_loss"] = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            self.disc_opt.zero_grad(set_to_none=True)
            losses["d_loss"].backward()
            self.world.average_gradients(self.disc.parameters())
            self.disc_opt.step()
        self.step += 1
        return {k: v.detach() for k, v in losses.items()}

    def state_dict(self) -> dict[str, Any]:
        """Model, optimiser and (when there is one) discriminator state, for a checkpoint."""
        out = {"model": self.model.state_dict(), "opt": self.opt.state_dict()}
        if self.disc is not None:
            out.update(disc=self.disc.state_dict(), disc_opt=self.disc_opt.state_dict())
        return out

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """float [-1, 1] [N, 3, R, R] -> their reconstructions from the posterior means (CPU)."""
        self.model.eval()
        out = [reconstruct(self.model, images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        self.model.train()
        return torch.cat(out)


@dataclass
class VaeResult:
    run_dir: Path | None  # None on a torchrun rank other than 0 (which writes nothing)
    step: int
    checkpoint: Path | None
    losses: dict[str, float]  # of the last step
    psnr: float | None  # held-out reconstruction PSNR, dB (None: not rank 0)
    images_per_s: float
    reconstruction: dict[str, Any] | None = (
        None  # trainers.autoencoders.recon_probe's report (None: not rank 0)
    )


def split_cache(config: Any, start_step: int = 0, world: World = SINGLE):
    """(training loader from step `start_step`, held-out images float [-1, 1] [n, 3, R, R], loader info,
    whose `condition` is None: an autoencoder reads images alone, held-out keys):
    a fixed seeded `eval_n` of the cache's images are held out (at most half of them). `config`: any
    config with cache, batch_size, seed, allow_partial and eval_n (VaeConfig, dvae_config.DvaeConfig).
    Under torchrun the loader yields this rank's slice of each global batch; every rank holds the same
    held-out images (only rank 0 evaluates)."""
    from trainers.data.loader import build_dataset
    from trainers.data.stream import CacheDataset, CacheLoader

    # perturb needs only the embed stage; the conditions are ignored here
    dataset, info = build_dataset(cache_loader_config(config, condition="perturb"))
    info = replace(info, condition=None)  # so its records (config.json, eval.json) name no condition
    n = len(dataset.rows_idx)
    n_eval = min(config.eval_n, n // 2)
    if n_eval < 1:
        raise ConfigError(f"--cache {config.cache}: {n} image(s); the autoencoder needs at least 2")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng([config.seed, 7]).permutation(n)[:n_eval]] = True
    train = CacheDataset(
        dataset.rows,
        dataset.rows_idx[~held],
        dataset.cond[~held],
        seed=config.seed,
        perturb_xi=None,
        paired_feat=None,
        paired_pool=np.zeros(int((~held).sum()), dtype=bool),
        paired_probability=0.0,
    )
    eval_rows = dataset.rows_idx[held]
    eval_images = dataset.rows.pixels(eval_rows).float().div_(127.5).sub_(1.0)
    loader = CacheLoader(train, info, config.batch_size, start_step, 0, world)
    return loader, eval_images, info, [dataset.rows.keys[int(r)] for r in eval_rows]


def run_vae(config: VaeConfig, progress: Any = None) -> VaeResult:
    """Train a run from scratch; checkpoints, config.json, metrics.jsonl and eval.json in its dir. Under
    torchrun, data-parallel (trainers/runtime/distributed.py): rank 0 writes, evaluates and returns the
    result."""
    config = config.with_learning_rate()  # recorded as the number it trains with
    return loop.launch(config, functools.partial(_run_vae, config), progress)


def _run_vae(config: VaeConfig, world: World, device_name: str, progress: Any) -> VaeResult:
    from core.clip import load_clip
    from feature_cache.embed_rows import cache_clip
    from manifests import write_json_atomic
    from trainers.autoencoders.recon_probe import measure
    from trainers.runtime.runs import seed_everything, select_device

    device = select_device(device_name)
    clip_info = cache_clip(config.cache)
    loader, eval_images, info, eval_keys = split_cache(config, 0, world)
    arch = vae_architecture(config.size, int(eval_images.shape[-1]))
    clip = load_clip(clip_info.clip_model, clip_info.clip_pretrained or None, str(device))  # seeds torch
    seed_everything(config.seed)
    trainer = VaeTrainer(config, arch, clip, device, world)
    world.broadcast([trainer.model] if trainer.disc is None else [trainer.model, trainer.disc])
    data = {**info.record(), "n_train": len(loader.dataset), "n_eval": len(eval_images)}
    parts = {"arch": arch, "clip": loop.clip_record(clip_info, clip.dim), "data": data}
    run_dir = None
    if world.main:  # the other ranks train in step and write nothing
        run_dir = loop.open_run(config, loop.Resume())
        loop.write_config(run_dir, "vae", config, **parts)
    record, advance = loop.checkpoint_record("vae", config, **parts), loop.step_counter(progress)
    trained = loop.train_steps(trainer, loader, config, run_dir, record, advance=advance, log_rate=False)
    if not world.main:
        return VaeResult(None, config.steps, None, trained.losses, None, trained.images_per_s)
    report = measure(config.cache, eval_images, trainer.reconstruct(eval_images), eval_keys, device_name)
    scores = {"step": config.steps, "psnr_db": report["psnr_db"], "n_eval": len(eval_images)}
    scores.update(trained.losses, reconstruction=report)
    write_json_atomic(run_dir / "eval.json", {**scores, "training_data": data})
    return VaeResult(
        run_dir,
        config.steps,
        trained.checkpoint,
        trained.losses,
        report["psnr_db"],
        trained.images_per_s,
        report,
    )
