"""DiT-style flow model: a transformer over 2x2 latent patches (or 4x4 pixel patches: `--space pixel`,
trainers/families/ldm/space.py), the text feature entering every block through adaLN-zero, plus the
rectified-flow maths and the guided Euler sampler.

Objective: rectified flow (Liu et al. 2022; SD3). x_t = (1 - t) x_0 + t eps on a straight path from the
data latent (t = 0) to noise (t = 1); the model predicts the constant velocity v = eps - x_0 (MSE).
Chosen over DDPM eps-prediction because there is no noise schedule to tune, the loss is well-scaled
at every t, and straight paths let a plain Euler sampler work with a few tens of steps (50 by default),
which keeps `trainers eval` (thousands of images) cheap. Training t is logit-normal (SD3's choice: it
weights the middle of the path, where the velocity is hardest to predict).

Classifier-free guidance: during training the condition is replaced, with probability `cond_drop`,
by a learned null embedding; sampling mixes v = v_uncond + g (v_cond - v_uncond).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import ConfigError
from trainers.runtime.distributed import SINGLE


@dataclass(frozen=True)
class DitSize:
    depth: int  # transformer blocks
    width: int  # token width
    heads: int  # attention heads
    patch: int  # latent patch side
    lr: float = 1e-4  # the default --lr (DiT's, for batch 256; AdamW without weight decay)


LDM_SIZES: dict[str, DitSize] = {
    # the CPU size (compare's cpu preset) and the tests. lr by measurement on the 32 px world, 6,000 steps
    # of batch 32 in pixel space: at 1e-4 colour and position stayed at chance, at 1e-3 they reached 0.97
    # and 0.98 (BENCHMARKS.md, "An LDM that learns its condition")
    "tiny": DitSize(2, 64, 2, 2, lr=1e-3),
    "S": DitSize(12, 384, 6, 2),  # DiT-S/2, ~33M parameters
    "B": DitSize(12, 768, 12, 2),  # DiT-B/2, ~130M parameters
}


PIXEL_PATCH_FACTOR = 2
"""In pixel space a size's patch is this many times its latent patch: the tiny size's 4 px patches make 64
tokens of a 32 px image (its 2-latent patches of a 4x-downsampled VAE: 16), a trade measured in
BENCHMARKS.md ("An LDM that learns its condition")."""


def ldm_architecture(
    size: str,
    latent_channels: int,
    latent_size: int,
    h_dim: int,
    latent_scale: float,
    space: str = "latent",
) -> dict[str, Any]:
    if size not in LDM_SIZES:
        raise ConfigError(f"--size {size}: choose one of {', '.join(LDM_SIZES)}")
    spec = LDM_SIZES[size]
    patch = spec.patch * (PIXEL_PATCH_FACTOR if space == "pixel" else 1)
    if latent_size % patch:
        what = "images" if space == "pixel" else "--vae: latents"
        raise ConfigError(f"{what} are {latent_size}px, not a multiple of the patch ({patch})")
    return {
        "size": size,
        "space": space,  # latent: a VAE's latents; pixel: the images (trainers.families.ldm.space)
        "depth": spec.depth,
        "width": spec.width,
        "heads": spec.heads,
        "patch": patch,
        "latent_channels": latent_channels,
        "latent_size": latent_size,
        "h_dim": h_dim,
        "latent_scale": float(latent_scale),  # latents are multiplied by it to have unit variance
        "cond_scale": math.sqrt(h_dim),  # unit-norm conditions times it: entries of unit RMS (see Dit)
    }


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = pos.double()[:, None] * freqs[None]  # [N, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # [N, dim]


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [grid * grid, width] (DiT, MAE)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([_sincos_1d(width // 2, ys.flatten()), _sincos_1d(width // 2, xs.flatten())], dim=1)
    return emb.float()


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """t in [0, 1] [B] -> sinusoidal features [B, dim] (t scaled by 1000, as DiT's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000 * t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DitBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )
        self.ada = nn.Sequential(
            nn.SiLU(), nn.Linear(width, 6 * width)
        )  # zero-init: each block starts as identity

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)  # 6 x [B, W]
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))  # [B, N, 3W]
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, W/H]
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)  # [B, N, W]
        x = x + gate1[:, None] * self.proj(attn)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Dit(nn.Module):
    """v = Dit(x_t [B, C, r, r], t [B], h [B, D], drop [B] bool or None) -> [B, C, r, r].

    The condition is multiplied by `arch["cond_scale"]` (sqrt(D)) before its MLP: a unit-norm 512-d text
    feature has entries of about 0.04, and through a Xavier-initialised Linear its embedding started 9-19x
    smaller than the timestep's (whose sin-cos features have unit entries). Scaled, both start alike. On
    the 32 px world at lr 1e-3 the scaling changed little by the end of 6,000 steps (BENCHMARKS.md): the
    learning rate was what kept the condition from being learnt. Checkpoints made before it have no
    `cond_scale` and keep 1."""

    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        self.arch = arch
        w, p, c = arch["width"], arch["patch"], arch["latent_channels"]
        self.grid = arch["latent_size"] // p
        self.patch_embed = nn.Conv2d(c, w, p, stride=p)
        self.register_buffer("pos", sincos_pos_embed(w, self.grid)[None], persistent=False)  # [1, N, W]
        self.t_embed = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.h_embed = nn.Sequential(nn.Linear(arch["h_dim"], w), nn.SiLU(), nn.Linear(w, w))
        # learned null condition (classifier-free guidance), in the text-feature space
        self.null_h = nn.Parameter(torch.randn(arch["h_dim"]) / math.sqrt(arch["h_dim"]))
        self.blocks = nn.ModuleList(DitBlock(w, arch["heads"]) for _ in range(arch["depth"]))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.final = nn.Linear(w, p * p * c)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in [*(b.ada[-1] for b in self.blocks), self.final_ada[-1], self.final]:  # adaLN-zero
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, r, _ = x.shape
        p, g = self.arch["patch"], self.grid
        if drop is not None:
            h = torch.where(drop[:, None], self.null_h.to(h.dtype)[None], h)  # [B, D]
        h = h * self.arch.get("cond_scale", 1.0)
        cond = self.t_embed(timestep_embedding(t)) + self.h_embed(h)  # [B, W]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # [B, N, W]
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.final_ada(cond).chunk(2, dim=1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))  # [B, N, p*p*C]
        out = out.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return out.reshape(b, c, r, r)


# --- rectified flow ---------------------------------------------------------------------------------------


def sample_t(batch: int, device: torch.device) -> torch.Tensor:
    """Logit-normal(0, 1) times in (0, 1) [B], from the global torch RNG."""
    return torch.sigmoid(torch.randn(batch, device=device))


def flow_loss(
    model: nn.Module, x0: torch.Tensor, h: torch.Tensor, cond_drop: float, world=SINGLE
) -> torch.Tensor:
    """MSE between the predicted and the true velocity eps - x0 at x_t = (1 - t) x0 + t eps. Under torchrun
    (`world`, trainers.runtime.distributed) t, eps and the dropout are drawn for the global batch and
    sliced."""
    b, n, part = x0.shape[0], x0.shape[0] * world.size, world.part
    t = part(sample_t(n, x0.device))  # [B]
    eps = part(torch.randn((n, *x0.shape[1:]), device=x0.device, dtype=x0.dtype))  # [B, C, r, r]
    drop = part(torch.rand(n, device=x0.device)) < cond_drop  # [B] -> null condition
    tt = t.view(b, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    v = model(x_t, t, h, drop)
    return F.mse_loss(v.float(), (eps - x0).float())


def guided_velocity(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, guidance: float
) -> torch.Tensor:
    """v_uncond + g (v_cond - v_uncond). g = 0 and g = 1 run only the branch they need, so g = 0 is
    unconditional sampling exactly (no 0 * (v_c - v_u) rounding) and g = 1 plain conditional sampling.
    The two branches are separate forwards, not one doubled batch: a batch's rows need not round as a
    half-size batch would, and the exactness above depends on that."""
    all_null = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if guidance == 0:
        return model(x, t, h, all_null)
    v_cond = model(x, t, h)
    if guidance == 1:
        return v_cond
    v_uncond = model(x, t, h, all_null)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample_euler(
    model: nn.Module, noise: torch.Tensor, h: torch.Tensor, steps: int = 50, guidance: float = 1.0
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise [B, C, r, r]) to t = 0 in `steps` uniform Euler steps."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    x = noise
    for i in range(steps):
        t = ts[i].expand(x.shape[0])  # [B]
        v = guided_velocity(model, x, t, h, guidance)
        x = x - (ts[i] - ts[i + 1]) * v.float()
    return x
