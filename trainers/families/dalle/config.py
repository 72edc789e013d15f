"""`trainers dalle`'s config: its options and their defaults, checked, its sampling defaults as sampler
arguments, and which options a resumed run may change. The trainer is trainers/families/dalle/train.py.

Light on purpose, as trainers/families/gan/config.py: `trainers dalle --help` reads its defaults from
`DalleConfig`, so nothing here imports torch or numpy at import time; validate() imports the size registry
(trainers.families.dalle.model) and the sampling checks when it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from trainers.engine.run_options import check_run_options
from trainers.runtime.runs import DEFAULT_PROMPTS, RunConfig


@dataclass(frozen=True)
class DalleConfig(RunConfig):
    cache: Path | None = None  # feature cache (read-only); on --resume the checkpoint's unless given
    dvae: Path | None = None  # `trainers dvae` checkpoint (or run dir: its latest), frozen
    out: Path = Path("runs")  # the run goes to OUT/{idx:03d}-{name}/
    name: str = "dalle"  # run name (a folder name)
    size: str = "small"  # DALLE_SIZES entry: tiny, mini (the CPU size), small, base
    condition: str = "optimize"  # conditioning source: optimize, retrieve, perturb, caption
    steps: int = 50_000  # total optimisation steps; a resumed run continues up to this
    batch_size: int = 64  # images per step
    lr: float = 3e-4  # AdamW peak learning rate
    weight_decay: float = 0.1  # on matrices and embeddings only (DalleTransformer.param_groups)
    warmup: int = 1000  # linear warm-up steps (clamped to steps // 2), then cosine to 0
    grad_clip: float = 1.0  # max global gradient norm, 0 for none
    seed: int = 0  # init, condition dropout and data order
    paired_fraction: float = 0.0  # share of samples given their real caption's feature
    paired_limit: int | None = None  # few-shot: N real pairs (only them with caption, else mixed in)
    allow_partial: bool = False  # train on the usable shards of a partial cache (see LoaderConfig)
    init: Path | None = None  # start from this `trainers dalle` checkpoint's weights (same architecture)
    cond_drop: float = 0.1  # share of samples trained with the null condition (for guidance)
    n_prefix: int = 4  # prefix slots the condition is projected to
    dropout: float = 0.0  # attention and residual dropout
    ema_decay: float = 0.9999  # EMA decay per step (warmed up: min(decay, (1 + step) / (10 + step)))
    guidance: float = 3.0  # sampling default: l_u + g (l_c - l_u); 0 unconditional, 1 conditional
    temperature: float = 1.0  # sampling default: logits / temperature
    top_k: int = 0  # sampling default: keep the k most likely tokens, 0 for all
    top_p: float = 1.0  # sampling default: nucleus mass kept, 1 for all
    workers: int = 0  # loader processes
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    checkpoint_every: int = 5000  # steps between checkpoints, 0 for the final one only
    log_every: int = 10  # steps between metrics.jsonl lines
    compile: str | None = None  # torch.compile backend of the training forward (inductor); None: eager
    sample_every: int = 1000  # steps between sample grids (EMA model, sampling defaults), 0: final only
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # sample-grid rows
    samples_per_prompt: int = 4  # sample-grid columns
    resume: Path | None = None  # checkpoint file or run directory (latest checkpoint) to continue

    def validate(self) -> None:
        from trainers.families.dalle.model import (
            DALLE_SIZES,  # torch: validate() runs for a command, not for its --help
        )
        from trainers.families.dalle.sample import check_sampling

        minimums = (
            ("--warmup", self.warmup, 0),
            ("--n-prefix", self.n_prefix, 1),
            ("--top-k", self.top_k, 0),
        )
        check_run_options(self, DALLE_SIZES, *minimums)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError("--weight-decay must be a number >= 0")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError("--grad-clip must be a number >= 0 (0: no clipping)")
        check_sampling(**sampling_options(self))
        if self.dvae is None:
            raise ConfigError("--dvae is required: a `trainers dvae` checkpoint or run directory")


def sampling_options(config: Any) -> dict[str, Any]:
    """The sampling defaults of a DalleConfig (or its dict) as `sample_tokens` arguments (0 / 1: off)."""
    get = config.get if isinstance(config, dict) else lambda k, d: getattr(config, k, d)
    top_k, top_p = int(get("top_k", 0)), float(get("top_p", 1.0))
    return {
        "guidance": float(get("guidance", 1.0)),
        "temperature": float(get("temperature", 1.0)),
        "top_k": top_k or None,
        "top_p": top_p if top_p < 1 else None,
    }


# What a resumed run may change; anything else given must match the checkpoint (trainers.runtime.runs).
# `dvae`: the same dVAE moved (its digest must be the recorded one).
RESUME_OVERRIDABLE = (
    *("cache", "dvae", "allow_partial", "steps", "checkpoint_every", "log_every", "device", "workers"),
    *("guidance", "temperature", "top_k", "top_p", "sample_every", "prompts", "samples_per_prompt"),
    "compile",
)
