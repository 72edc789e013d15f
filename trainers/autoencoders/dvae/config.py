"""`trainers dvae`'s config: its options and their defaults, checked, and which of them a resumed run may
change. The trainer is trainers/autoencoders/dvae/train.py.

Light on purpose, as trainers/families/gan/config.py: `trainers dvae --help` reads its defaults from
`DvaeConfig`, so nothing here imports torch or numpy at import time; validate() imports the size registry
(trainers.autoencoders.dvae.model) when it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from trainers.engine.run_options import check_run_options
from trainers.runtime.runs import RunConfig


@dataclass(frozen=True)
class DvaeConfig(RunConfig):
    cache: Path | None = None  # feature cache (its images); on --resume the checkpoint's unless given
    out: Path = Path("runs")  # the run goes to OUT/{idx:03d}-{name}/
    name: str = "dvae"  # run name (a folder name)
    size: str = "small"  # DVAE_SIZES entry: tiny (x4, 64 codes), small (x4), small8 (x8)
    # fsq (finite scalar quantisation) or gumbel (a codebook, gumbel-softmax, KL: DALL-E's). Tiny, 2,000
    # steps on the 32 px world, what the probe reads on reconstructions of colour / position, of the real
    # images': gumbel 0.29 / 0.35, fsq 0.87 / 0.92 at lr 1e-3, 0.91 / 0.98 at 2e-3 (BENCHMARKS.md)
    quantizer: str = "fsq"
    steps: int = 20_000  # total optimisation steps; a resumed run continues up to this
    batch_size: int = 32  # images per step (the global batch under torchrun, split between the ranks)
    lr: float = 2e-3  # Adam learning rate (measured with fsq, above; gumbel was tuned at 1e-3)
    seed: int = 0  # init, gumbel noise, data order and the held-out choice
    # gumbel: beta once warmed up, on the KL in nats per cell (the MSE is per element). Tiny, 400 steps:
    # 1e-3 -> perplexity 2.2 of 64, 20.0 dB; 0.02 -> 5.1, 21.0 dB; 0.1 -> 2.6, 17.2 dB
    kl_weight: float = 0.02
    kl_warmup: int | None = None  # steps of beta's linear rise from 0 (0: none); None: steps / 4
    tau_start: float = 1.0  # gumbel-softmax temperature at step 0
    tau_end: float = 1 / 16  # ... reached at anneal_steps, kept after
    anneal_steps: int | None = None  # steps of the geometric temperature schedule; None: steps / 2
    eval_n: int = 64  # held-out images for eval.json (never trained on)
    allow_partial: bool = (
        False  # train on the usable shards of a partial cache (trainers.data.loader.LoaderConfig)
    )
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    checkpoint_every: int = 5000  # steps between checkpoints, 0 for the final one only
    log_every: int = 10  # steps between metrics.jsonl lines
    resume: Path | None = None  # checkpoint file or run directory (latest checkpoint) to continue

    @property
    def annealing_steps(self) -> int:
        """Steps of the temperature schedule: --anneal-steps, else half of --steps (so a short run ends cold,
        with codes as hard as the ones it is evaluated and encoded with)."""
        return self.anneal_steps if self.anneal_steps is not None else max(1, self.steps // 2)

    @property
    def warmup_steps(self) -> int:
        """Steps of the KL-weight warm-up: --kl-warmup, else a quarter of --steps."""
        return self.kl_warmup if self.kl_warmup is not None else self.steps // 4

    def validate(self) -> None:
        minimums = (("--eval-n", self.eval_n, 1), ("--kl-warmup", self.warmup_steps, 0))
        from trainers.autoencoders.dvae.model import (
            DVAE_SIZES,  # torch: validate() runs for a command, not for its --help
        )

        check_run_options(self, DVAE_SIZES, *minimums, ("--anneal-steps", self.annealing_steps, 1))
        from trainers.autoencoders.dvae.model import QUANTIZERS

        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"--quantizer {self.quantizer}: choose one of {', '.join(QUANTIZERS)}")
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ConfigError(f"--kl-weight must be a number >= 0, got {self.kl_weight}")
        for flag, tau in (("--tau-start", self.tau_start), ("--tau-end", self.tau_end)):
            if not (math.isfinite(tau) and tau > 0):
                raise ConfigError(f"{flag} must be a positive number, got {tau}")


# What a resumed run may change; anything else given must match the checkpoint (trainers.runtime.runs).
RESUME_OVERRIDABLE = ("cache", "allow_partial", "steps", "checkpoint_every", "log_every", "device")
