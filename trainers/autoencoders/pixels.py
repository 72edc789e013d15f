"""Pixel helpers the autoencoders and their reconstruction probe share: images about [-1, 1] to uint8,
and PSNR."""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, R, R] about [-1, 1] -> uint8 [B, 3, R, R] on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images (peak 1 on the [0, 1] scale) -> [B]."""
    mse = ((recon.clamp(-1, 1) - target) / 2).square().mean(dim=[1, 2, 3])  # [B]
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
