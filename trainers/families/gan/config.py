"""`trainers gan`'s config: its options and their defaults, checked, and which of them a resumed run may
change. The trainer is trainers/families/gan/train.py.

Light on purpose, as pipeline/embed/config.py: `trainers gan --help` reads its defaults from `GanConfig`
(cli.options.defaults_from), so nothing here imports torch or numpy at import time; validate()
imports the size registry (trainers.families.gan.model) when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from trainers.engine.run_options import check_run_options
from trainers.runtime.runs import DEFAULT_PROMPTS, RunConfig


@dataclass(frozen=True)
class GanConfig(RunConfig):
    SIZES = (
        "trainers.families.gan.model:GAN_SIZES"  # the default --lr is the size's (RunConfig.learning_rate)
    )

    cache: Path | None = None  # feature cache (read-only); on --resume the checkpoint's unless given
    out: Path = Path("runs")  # the run goes to OUT/{idx:03d}-{name}/
    name: str = "gan"  # run name (a folder name)
    size: str = "small"  # GAN_SIZES entry: tiny (32 px; the CPU size), small (64 px), base (128-256 px)
    condition: str = "optimize"  # conditioning source: optimize, retrieve, perturb, caption
    steps: int = 20_000  # total optimisation steps; a resumed run continues up to this
    batch_size: int = 32  # images per step (InfoNCE contrasts within the batch: at least 2)
    lr: float | None = None  # Adam lr of G and D (D's scaled for lazy R1); None: the size's (GAN_SIZES)
    seed: int = 0  # model init, z, noise, augmentation and data order
    paired_fraction: float = 0.0  # share of each batch conditioned on real captions (few-shot runs)
    paired_limit: int | None = None  # few-shot: N real pairs (only them with caption, else mixed in)
    init: Path | None = None  # start from this `trainers gan` checkpoint's weights (same architecture)
    allow_partial: bool = (
        False  # train on the usable shards of a partial cache (trainers.data.loader.LoaderConfig)
    )
    workers: int = 0  # loader processes
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    sample_every: int = 1000  # steps between sample grids, 0 for the final one only
    checkpoint_every: int = 5000  # steps between checkpoints, 0 for the final one only
    log_every: int = 10  # steps between metrics.jsonl lines and progress-bar loss updates
    compile: str | None = None  # torch.compile backend of the training forward (inductor); None: eager
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # sample-grid rows
    samples_per_prompt: int = 4  # sample-grid columns
    r1_gamma: float | None = None  # R1 weight; None: StyleGAN2-ADA's heuristic 0.0002 * res^2 / batch
    r1_every: int = 16  # lazy regularisation: R1 on every 16th step, scaled by 16
    con_g_weight: float = 10.0  # L_ConG weight (CLIP features of fakes vs h)
    con_d_weight: float = 5.0  # L_ConD weight (D features vs h: reals for D, fakes for G)
    tau: float = 0.5  # InfoNCE temperature of both contrastive terms
    ema_kimg: float = 10.0  # EMA half-life, thousands of images
    ema_rampup: float = 0.05  # early on, the half-life is at most this share of the images seen
    resume: Path | None = None  # checkpoint file or run directory (latest checkpoint) to continue

    def validate(self) -> None:
        # the cache is checked when it is read (trainers.families.gan.source): tests and benchmarks give
        # batches
        from trainers.families.gan.model import (
            GAN_SIZES,  # torch: validate() runs for a command, not for its --help
        )

        check_run_options(self, GAN_SIZES, ("r1_every", self.r1_every, 1), min_batch=2, needs_cache=False)
        if not self.tau > 0:
            raise ConfigError(f"--tau {self.tau}: the InfoNCE temperature must be positive")
        for flag, value in (("--con-g-weight", self.con_g_weight), ("--con-d-weight", self.con_d_weight)):
            if not value >= 0:
                raise ConfigError(f"{flag} {value}: a loss weight must be zero or positive")
        if min(self.r1_gamma or 0.0, self.ema_kimg) < 0:
            raise ConfigError("r1_gamma and ema_kimg must be non-negative")


# What a resumed run may change; anything else given must match the checkpoint (it shapes the model,
# the data or the losses, and changing it would not be a continuation).
RESUME_OVERRIDABLE = (
    "cache",
    "compile",
    "allow_partial",
    "steps",
    "sample_every",
    "checkpoint_every",
    "log_every",
    "device",
    "workers",
    "prompts",
    "samples_per_prompt",
)
