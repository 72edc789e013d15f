"""`pipeline optimize`'s config: its methods, their parameters and defaults, which of them are keyed, and
the variants (`optimize-{name}/` beside the default `optimize/`). The stage is pipeline/optimize/stage.py.

Light on purpose: `pipeline optimize`'s signature reads its defaults from `OptimizeConfig` when
cli/pipeline.py is imported, before the root callback sets the thread count
(core.processes.start_threads) and for every command, so nothing here may import numpy or torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from feature_cache.steps import check_variant, variant_stage
from methods.registry import METHODS

if TYPE_CHECKING:
    from methods.common import Hyper

PARAMETRISATIONS = ("weights", "residual")

STAGE = "optimize"
STAGE_VERSION = "1"
BACKENDS = ("auto", "triton", "torch")
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
# Default Adam learning rates. Adam moves every coordinate by about lr per step, whatever the gradient's
# scale. `weights`: the k mixing logits start at sim / tau_r, a few units apart, and 0.1 lets 20 steps
# re-rank the neighbours (in-batch top-1 0.29 -> 0.48 on the structured D=512 world of the tuning run;
# 0.3 reaches 0.48 too, 0.03 only 0.38). `residual`: delta has D coordinates of size ~1/sqrt(D), so a
# fixed lr means a D-dependent step; lr = 0.05 / sqrt(D) bounds each step's move of h0 + delta to ~0.05
# in norm (0.0022 at D=512). Twice that pulled h across half the modality gap towards the images in 20
# steps (its text-side component 0.67 -> 0.43) for no gain in top-1 (1.0 either way on that world).
WEIGHTS_LR = 0.1
RESIDUAL_STEP_NORM = 0.05


@dataclass(frozen=True)
class OptimizeConfig:
    cache: Path = Path("cache")  # the feature cache directory
    method: str = "optimize"  # optimize | retrieve | perturb
    param: str = "weights"  # optimize: learn mixing logits over the k neighbours, or a residual offset
    xi: float = 3.0  # perturb: noise scale relative to |f| (LAFITE's code default)
    tau_r: float = 0.05  # retrieve/optimize: softmax temperature over the k neighbour similarities
    tau: float = 0.07  # optimize: InfoNCE temperature
    proximity: float = 1.0  # optimize: weight of mean |h - h0|^2 (one unit ~ one nat of InfoNCE)
    steps: int = 20  # optimize: Adam steps per batch (0 gives the retrieve result)
    lr: float | None = None  # optimize: Adam learning rate; None: 0.1 (weights), 0.05 / sqrt(D) (residual)
    batch_size: int = 65_536  # optimize: images per batch, clamped to the shard (keyed: the negatives)
    seed: int = 0  # perturb noise and the batch shuffle, per (seed, shard)
    backend: str = "auto"  # contrastive kernel: auto | triton | torch (not keyed: same maths)
    precision: str = "auto"  # loss kernel inputs: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (not keyed)
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda", "cuda:1" (not keyed)
    verify: bool = False  # re-hash this stage's outputs instead of trusting size + mtime
    force: bool = False  # remake every shard even when up to date
    variant: str = ""  # a named variant beside the default: its own shards in optimize-{variant}/

    @property
    def stage(self) -> str:
        """The stage (and folder) this variant's shards and manifests live in."""
        return variant_stage(self.variant)

    def validate(self) -> None:
        check_variant(self.variant)
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.param not in PARAMETRISATIONS:
            raise ConfigError(f"--param must be one of {', '.join(PARAMETRISATIONS)}, not {self.param!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        for flag, value in (("--xi", self.xi), ("--proximity", self.proximity)):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{flag} must be a finite number >= 0")
        for flag, value in (("--tau-r", self.tau_r), ("--tau", self.tau), ("--lr", self.lr)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{flag} must be a finite number > 0")
        if self.steps < 0:
            raise ConfigError("--steps must be 0 (keep the retrieve result) or more")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.backend == "triton" and self.device == "cpu":
            raise ConfigError("--backend triton needs a CUDA device; use --backend torch (or auto) on CPU")

    @property
    def needs_neighbours(self) -> bool:
        return METHODS[self.method].needs_neighbours

    def learning_rate(self, dim: int) -> float:
        if self.lr is not None:
            return self.lr
        return WEIGHTS_LR if self.param == "weights" else round(RESIDUAL_STEP_NORM / dim**0.5, 8)

    def loss_dtype(self, device) -> str:
        if self.precision == "auto":
            return "bfloat16" if device.type == "cuda" else "float32"
        return PRECISIONS[self.precision]

    def hyper(self, dim: int, device) -> Hyper:
        from methods.common import Hyper  # torch: imported only when computing

        return Hyper(
            method=self.method,
            param=self.param,
            xi=self.xi,
            tau_r=self.tau_r,
            tau=self.tau,
            proximity=self.proximity,
            steps=self.steps,
            lr=self.learning_rate(dim),
            backend=self.backend,
            loss_dtype=self.loss_dtype(device),
        )

    def keyed_params(self, dim: int, shard_rows: int | None = None) -> dict[str, Any]:
        """Only what changes this method's output: `--tau` does not stale `retrieve` shards, and the batch
        size is keyed as clamped to the shard (`shard_rows`): any B >= n gives the same single batch."""
        resolved = {
            "lr": self.learning_rate(dim),  # resolved, so `--lr` equal to the default stales nothing
            "batch_size": min(self.batch_size, shard_rows or self.batch_size),  # batches are the negatives
        }
        keyed = METHODS[self.method].keyed  # the method's own (methods/), so written once
        return {"method": self.method, **{name: resolved.get(name, getattr(self, name)) for name in keyed}}

    def unkeyed_params(self) -> dict[str, Any]:
        # Like embed's device (bf16 autocast on CUDA, fp32 on CPU): these change rounding, not the maths,
        # and keying them would remake the cache whenever a shard lands on another kind of machine.
        return {"device": self.device, "backend": self.backend, "precision": self.precision}
