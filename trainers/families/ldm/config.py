"""`trainers ldm`'s config: its options and their defaults, checked, and which of them a resumed run may
change. The trainer is trainers/families/ldm/train.py.

Light on purpose, as trainers/families/gan/config.py: `trainers ldm --help` reads its defaults from
`LdmConfig`, so nothing here imports torch or numpy at import time; validate() imports the size registry
(trainers.families.ldm.model) when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from trainers.engine.run_options import check_run_options
from trainers.runtime.runs import DEFAULT_PROMPTS, RunConfig

SPACES = ("latent", "pixel")  # where the flow model works (trainers.families.ldm.space)


@dataclass(frozen=True)
class LdmConfig(RunConfig):
    SIZES = (
        "trainers.families.ldm.model:LDM_SIZES"  # the default --lr is the size's (RunConfig.learning_rate)
    )

    cache: Path | None = None  # feature cache (read-only); on --resume the checkpoint's unless given
    vae: Path | None = None  # `trainers vae` checkpoint (or run dir: its latest), frozen; --space latent
    space: str = (
        "latent"  # latent: diffuse a frozen VAE's latents; pixel: the images (trainers.families.ldm.space)
    )
    out: Path = Path("runs")  # the run goes to OUT/{idx:03d}-{name}/
    name: str = "ldm"  # run name (a folder name)
    size: str = "S"  # LDM_SIZES entry: tiny (32 px; the CPU size), S, B
    condition: str = "optimize"  # conditioning source: optimize, retrieve, perturb, caption
    steps: int = 50_000  # total optimisation steps; a resumed run continues up to this
    batch_size: int = 64  # images per step
    lr: float | None = None  # AdamW learning rate (no weight decay); None: the size's (LDM_SIZES)
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
    compile: str | None = None  # torch.compile backend of the training forward (inductor); None: eager
    sample_every: int = 1000  # steps between sample grids (EMA model, `guidance`), 0 for the final one only
    sample_steps: int = 25  # Euler steps of the grids
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # sample-grid rows
    samples_per_prompt: int = 4  # sample-grid columns
    resume: Path | None = None  # checkpoint file or run directory (latest checkpoint) to continue

    def validate(self) -> None:
        from trainers.families.ldm.model import (
            LDM_SIZES,  # torch: validate() runs for a command, not for its --help
        )

        check_run_options(self, LDM_SIZES, ("sample_steps", self.sample_steps, 1))
        if self.space not in SPACES:
            raise ConfigError(f"--space {self.space}: choose one of {', '.join(SPACES)}")
        if self.space == "latent" and self.vae is None:
            raise ConfigError(
                "--vae is required: a `trainers vae` checkpoint or run directory (or --space pixel)"
            )
        if self.space == "pixel" and self.vae is not None:
            raise ConfigError("--vae is for --space latent: in pixel space there is no autoencoder")


RESUME_OVERRIDABLE = (
    "cache",
    "compile",
    "allow_partial",
    "steps",
    "checkpoint_every",
    "log_every",
    "device",
    "workers",
    "guidance",
    "sample_every",
    "sample_steps",
    "prompts",
    "samples_per_prompt",
)
