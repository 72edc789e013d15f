"""perturb (LAFITE): h = normalize(f + xi * eps * |f| / |eps|), eps ~ N(0, I); its starting point is f."""

from __future__ import annotations

from typing import TYPE_CHECKING

from methods.method import Batch, Method

if TYPE_CHECKING:
    import torch


def perturb(f: torch.Tensor, noise: torch.Tensor, xi: float) -> torch.Tensor:
    """LAFITE's pseudo feature: `f` plus Gaussian noise scaled to `xi` times |f|, renormalised."""
    import torch.nn.functional as F

    eps_norm = noise.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return F.normalize(f + xi * noise * f.norm(dim=1, keepdim=True) / eps_norm, dim=1)


def _features(f, batch: Batch, hp) -> tuple:
    return f, perturb(f, batch.noise, hp.xi), 0.0


PERTURB = Method(
    "perturb",
    "LAFITE: the image feature plus Gaussian noise of --xi times its norm; needs only embed",
    keyed=("xi", "seed"),
    features=_features,
    needs_neighbours=False,
    needs_noise=True,
)
