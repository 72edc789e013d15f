"""A `trainers gan` checkpoint loaded for sampling: `generate(cond, seed)` with its EMA generator
(trainers/eval/sample.py reads checkpoints of every family)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.paths import resolve_recorded
from trainers.engine.family import Generate


def load_gan(path: Path, ckpt: dict[str, Any], *, device: str = "auto") -> tuple[Generate, dict[str, Any]]:
    """A loaded `trainers gan` checkpoint as `generate(cond [N, D], seed) -> uint8 [N, 3, R, R]` (its EMA
    generator) and its info (see `load_generator`)."""
    import torch

    from trainers.families.gan.model import build_models
    from trainers.runtime.runs import select_device

    if "G_ema" not in ckpt:
        raise ConfigError(f"--checkpoint {path}: not a `trainers gan` checkpoint (no G_ema)")
    arch = ckpt["arch"]
    G, _ = build_models(arch)
    G.load_state_dict(ckpt["G_ema"])
    G = G.to(select_device(device)).eval().requires_grad_(False)

    def generate(cond: torch.Tensor, seed: int) -> torch.Tensor:
        cond = torch.as_tensor(cond, dtype=torch.float32)
        if cond.dim() != 2 or cond.shape[1] != arch["h_dim"]:
            raise ValueError(
                f"cond must be [N, {arch['h_dim']}] (the run's CLIP dim), got {tuple(cond.shape)}"
            )
        return G.sample(cond, seed)  # [N, 3, R, R] uint8 on the CPU

    info = {
        "kind": "gan",
        "step": int(ckpt["step"]),
        "config": ckpt["config"],
        # older runs recorded the cache's CLIP files relative to where they ran: find them from here
        "clip_model": resolve_recorded(ckpt["clip"]["model"], path),
        "clip_pretrained": resolve_recorded(ckpt["clip"]["pretrained"], path),
        "resolution": arch["resolution"],
        "h_dim": arch["h_dim"],
        "size": arch["size"],
        "checkpoint": str(path),
        "data": ckpt.get("data"),  # the rows it was trained on (trainers.data.loader.LoaderInfo.record)
    }
    return generate, info
