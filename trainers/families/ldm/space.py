"""Where `trainers ldm` diffuses: a frozen `trainers vae`'s latents (`--space latent`) or the pixels
themselves (`--space pixel`).

What an autoencoder drops (an object's shape, its colour) no generator trained in its latents can draw.
In pixel space the "autoencoder" is the identity: the flow model is trained on the images in [-1, 1] and
its samples are the images, so nothing is lost on the way, at the price of 4x more tokens per side. On the
32 px world the mini VAE's latents won at the same steps (BENCHMARKS.md, "An LDM that learns its
condition"), so compare's presets diffuse latents; pixel space is the reference that shows what the
autoencoder costs, and the choice where none keeps the objects.
Both spaces give the trainer and the sampler the same two things: a frozen module with the VAE's
`encode(x) -> (mean, logvar)` and `decode(z)`, and the record the checkpoint keeps of it.

    space, record = load_space("pixel", None, resolution=32)
    z = space.encode(images)[0]      # the pixels themselves
    images = space.decode(z)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from core.errors import ConfigError
from trainers.families.ldm.config import SPACES


class PixelSpace(nn.Module):
    """The identity autoencoder: latents are the images [B, 3, R, R] in [-1, 1], with zero variance."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.full_like(x, -30.0)  # the VAE's clamped minimum log-variance: a point posterior

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def downsampling(space: str) -> int:
    """Image side / latent side: the VAEs' 4, the pixels' 1."""
    return 1 if space == "pixel" else 4


def load_space(
    space: str, vae: Path | str | None, resolution: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """-> (frozen encode/decode module on the CPU, its record: path, step, arch with resolution and
    latent_channels). `vae`: the `trainers vae` checkpoint of `latent`; `resolution`: the images' side in
    `pixel` space, which has no checkpoint to read it from (None: any)."""
    if space not in SPACES:
        raise ConfigError(f"--space {space}: choose one of {', '.join(SPACES)}")
    if space == "latent":
        from trainers.autoencoders.vae.model import load_vae

        return load_vae(vae, "--vae")
    record = {"path": None, "step": 0, "arch": {"resolution": resolution, "latent_channels": 3}}
    return PixelSpace().eval(), record
