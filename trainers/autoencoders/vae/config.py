"""`trainers vae`'s config: its options and their defaults, checked, and config.json's form of them. The
trainer is trainers/autoencoders/vae/model.py.

Light on purpose, as trainers/families/gan/config.py: `trainers vae --help` reads its defaults from
`VaeConfig`, so nothing here imports torch or numpy at import time; validate() imports the size registry
(trainers.autoencoders.vae.model) when it runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from trainers.engine.run_options import check_run_options
from trainers.runtime.runs import RunConfig


@dataclass(frozen=True)
class VaeConfig(RunConfig):
    # the default --lr is the size's (RunConfig.learning_rate)
    SIZES = "trainers.autoencoders.vae.model:VAE_SIZES"

    cache: Path | None = None  # feature cache (its images; conditions are not used)
    out: Path = Path("runs")  # the run goes to OUT/{idx:03d}-{name}/
    name: str = "vae"  # run name (a folder name)
    size: str = "small"  # VAE_SIZES entry
    steps: int = 10_000  # optimisation steps
    batch_size: int = 32  # images per step (the global batch under torchrun, split between the ranks)
    lr: float | None = (
        None  # Adam learning rate; None: the size's (trainers.autoencoders.vae.model.VAE_SIZES)
    )
    seed: int = 0  # init, posterior noise, data order and the held-out choice
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    recon_loss: str = "mse"  # the reconstruction term: l1 or mse (l1 drops small objects: BENCHMARKS.md)
    perceptual_weight: float = 0.5  # CLIP-feature term weight
    kl_weight: float = 1e-6  # KL weight (per image element, see the module docstring)
    disc_weight: float = 0.0  # patch-discriminator term weight; 0: no discriminator
    disc_start: int = 2000  # first step with the adversarial terms (the warm-up before it)
    eval_n: int = 64  # held-out images for the PSNR in eval.json (never trained on)
    allow_partial: bool = (
        False  # train on the usable shards of a partial cache (trainers.data.loader.LoaderConfig)
    )
    checkpoint_every: int = 5000  # steps between checkpoints, 0 for the final one only
    log_every: int = 10  # steps between metrics.jsonl lines

    def validate(self) -> None:
        from trainers.autoencoders.vae.model import (
            VAE_SIZES,  # torch: validate() runs for a command, not for its --help
        )

        minimums = (("--eval-n", self.eval_n, 1), ("--disc-start", self.disc_start, 0))
        check_run_options(self, VAE_SIZES, *minimums)
        if self.recon_loss not in ("l1", "mse"):
            raise ConfigError(f"--recon-loss {self.recon_loss}: choose l1 or mse")
        if min(self.perceptual_weight, self.kl_weight) < 0:
            raise ConfigError("the perceptual and KL weights must be non-negative")
        if not (math.isfinite(self.disc_weight) and self.disc_weight >= 0):
            raise ConfigError(
                f"--disc-weight must be a number >= 0 (0: no discriminator), got {self.disc_weight}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("cache", "out"):
            out[key] = None if out[key] is None else str(out[key])
        return out
