"""DALL-E's discrete VAE (Ramesh et al. 2021) at small scale: images <-> a grid of K-way codes.

    logits = E(x)                                   [B, K, h, w], h = w = R / downsample
    y = softmax((logits + g) / tau)                 gumbel-softmax relaxation, g ~ Gumbel(0, 1)
    z = y . codebook                                [B, D, h, w]: a soft mix of the K code vectors
    x' = D(z)                                       [B, 3, R, R]
    loss = |x - x'|^2  +  beta(step) * KL(softmax(logits) || uniform(K))

The temperature tau is annealed from 1 to 1/16 (geometrically) so the relaxed codes become nearly one-hot,
and beta is warmed up from 0 (linearly): early on the KL term would keep every cell's distribution flat
before the decoder has learnt what codes mean; later it keeps the whole codebook in use (the uniform
prior is what the transformer's first guess is). The reconstruction term is the mean squared error,
not DALL-E's logit-Laplace likelihood: at 32-64 px it is what the held-out PSNR measures.

At encode time the codes are hard: `encode_codes` takes each cell's argmax, and `decode_codes` looks the
code vectors up, so tokens -> image is deterministic (`decode_tokens`, for the `trainers dalle` sampler).

`--quantizer fsq` replaces the codebook by finite scalar quantisation (Mentzer et al. 2023): the encoder
gives d = len(levels) channels per cell, each bounded (tanh) to L_i levels and rounded (the gradient
passes the rounding unchanged), so a cell's code is one of prod(L_i) points of a grid (K = 64: levels
8 x 8; K = 512: 8 x 8 x 8), its token the mixed-radix number of its digits. No codebook to collapse, no
temperature, no KL: the loss is the MSE alone, and every code is a point the decoder is trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import ConfigError
from trainers.autoencoders.pixels import to_uint8
from trainers.autoencoders.vae.model import ResBlock, _norm
from trainers.runtime.distributed import SINGLE, World


@dataclass(frozen=True)
class DvaeSize:
    channels: tuple[int, ...]  # widths at full resolution and after each x2 down (downsample = 2^(len-1))
    vocab_size: int = 512  # K codes per cell
    embed_dim: int = 64  # width of a code vector


DVAE_SIZES: dict[str, DvaeSize] = {
    "tiny": DvaeSize((8, 16, 32), vocab_size=64, embed_dim=16),  # tests: x4, 65k parameters
    # the cpu preset's: x4, K 512. On the 32 px world (fsq, 2,000 steps) it keeps colour 0.97, position
    # 1.00 and size 0.90 of the real images' reading where tiny's 64 codes keep 0.52, 0.83, 0.80
    "mini": DvaeSize((16, 32, 64)),
    "small": DvaeSize((32, 64, 128)),  # x4, K 512, 1.1M: 32 px -> 8 x 8 tokens, 64 px -> 16 x 16
    "small8": DvaeSize((32, 64, 128, 128)),  # x8, K 512, 2.0M: 64 px -> 8 x 8 tokens
}
MAX_VOCAB = 2**15 - 1  # tokens are stored as int16
QUANTIZERS = ("gumbel", "fsq")
FSQ_LEVELS = {64: (8, 8), 512: (8, 8, 8)}  # per vocabulary size (Mentzer et al.: levels >= 5 work best)


def fsq_quantize(z: torch.Tensor, levels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output [B, d, h, w] (d = len(levels)) -> (the grid point each cell rounds to, in [-1, 1],
    with the rounding's gradient passed straight through; its code int64 [B, h, w])."""
    lv = torch.tensor(levels, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
    half = (lv - 1) / 2
    offset = (1 - lv % 2) / 2  # even L: the grid is not symmetric about 0
    bounded = torch.tanh(z + torch.atanh(offset / half)) * half - offset  # in (-L/2, L/2)
    rounded = bounded + (bounded.round() - bounded).detach()  # straight-through estimator
    digits = (rounded.detach().round() + lv // 2).long()  # [B, d, h, w] in 0 .. L - 1
    return rounded / (lv // 2), (digits * _radix(levels, z.device).view(1, -1, 1, 1)).sum(dim=1)


def fsq_points(codes: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Codes int [B, h, w] -> their grid points [B, d, h, w] in [-1, 1] (what `fsq_quantize` gave)."""
    lv = torch.tensor(levels, device=codes.device).view(1, -1, 1, 1)
    digits = (codes.long().unsqueeze(1) // _radix(levels, codes.device).view(1, -1, 1, 1)) % lv
    return ((digits - lv // 2) / (lv // 2)).float()


def _radix(levels: tuple[int, ...], device) -> torch.Tensor:
    return torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], device=device)


class DiscreteVAE(nn.Module):
    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        widths = list(arch["channels"])
        k, d = int(arch["vocab_size"]), int(arch["embed_dim"])
        self.vocab_size, self.grid, self.resolution = k, tuple(arch["grid"]), int(arch["resolution"])
        self.levels = tuple(arch.get("levels") or ())  # FSQ's; () for the gumbel codebook
        width = len(self.levels) or k  # the encoder's output per cell: FSQ coordinates, or code logits
        enc: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            enc += [ResBlock(c_in, c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]  # side / 2
        top = widths[-1]
        enc += [ResBlock(top, top), _norm(top), nn.SiLU(), nn.Conv2d(top, width, 1)]
        self.encoder = nn.Sequential(*enc)
        if not self.levels:
            self.codebook = nn.Embedding(k, d)
        dec: list[nn.Module] = [nn.Conv2d(len(self.levels) or d, top, 1), ResBlock(top, top)]
        for c_in, c_out in zip(widths[:0:-1], widths[-2::-1], strict=True):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
            dec += [ResBlock(c_out, c_out)]  # side * 2
        dec += [_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> code logits [B, K, h, w] (FSQ: its coordinates [B, d, h, w])."""
        return self.encoder(x)

    def decode_soft(self, y: torch.Tensor) -> torch.Tensor:
        """Code weights [B, K, h, w] (relaxed or one-hot) -> [B, 3, R, R] (about [-1, 1], not clamped)."""
        z = torch.einsum("bkhw,kd->bdhw", y, self.codebook.weight)  # [B, D, h, w]
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, temperature: float, world: World = SINGLE
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Training pass: (reconstruction [B, 3, R, R], logits [B, K, h, w], hard codes [B, h, w]); the
        gumbel noise is drawn from torch's global generator (so a resumed run, which restores it, draws the
        same), under torchrun (`world`) for the global batch, this rank's rows kept. FSQ: logits None."""
        if self.levels:
            points, codes = fsq_quantize(self.logits(x), self.levels)
            return self.decoder(points), None, codes
        logits = self.logits(x)
        shape = (logits.shape[0] * world.size, *logits.shape[1:])
        exp = world.part(torch.empty(shape, device=logits.device, dtype=logits.dtype).exponential_())
        gumbel = -exp.log()  # [B, K, h, w] ~ Gumbel(0, 1)
        y = F.softmax((logits + gumbel) / temperature, dim=1)
        return self.decode_soft(y), logits, logits.detach().argmax(dim=1)

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> hard codes int64 [B, h, w] (each cell's most likely code)."""
        if self.levels:
            return fsq_quantize(self.logits(x), self.levels)[1]
        return self.logits(x).argmax(dim=1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """int [B, h, w] -> [B, 3, R, R] (about [-1, 1], not clamped)."""
        if self.levels:
            return self.decoder(fsq_points(codes, self.levels))
        z = self.codebook(codes.long()).permute(0, 3, 1, 2)  # [B, D, h, w]
        return self.decoder(z)


@torch.no_grad()
def reconstruct(model: DiscreteVAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `--encode` keeps of float [-1, 1] images: (decoded hard codes, the codes), on the CPU."""
    codes = model.encode_codes(images.to(next(model.parameters()).device).float())
    return model.decode_codes(codes).float().cpu(), codes.cpu()


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || uniform over K) in nats per cell, averaged over cells and the batch."""
    log_q = F.log_softmax(logits.float(), dim=1)  # [B, K, h, w]
    return (log_q.exp() * log_q).sum(dim=1).mean() + math.log(logits.shape[1])


def codebook_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, float | int]:
    """How much of the codebook hard codes (any shape) use: perplexity exp(H(code frequencies)) (K when
    every code is equally frequent, 1 when one code is everywhere) and the count of codes never used."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=vocab_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "dead_codes": int((counts == 0).sum())}


def dvae_architecture(size: str, resolution: int, quantizer: str = "gumbel") -> dict[str, Any]:
    if size not in DVAE_SIZES:
        raise ConfigError(f"--size {size}: choose one of {', '.join(DVAE_SIZES)}")
    if quantizer not in QUANTIZERS:
        raise ConfigError(f"--quantizer {quantizer}: choose one of {', '.join(QUANTIZERS)}")
    spec = DVAE_SIZES[size]
    down = 2 ** (len(spec.channels) - 1)
    if resolution % down:
        raise ConfigError(f"--cache: images are {resolution}px; --size {size} needs a multiple of {down}")
    if spec.vocab_size > MAX_VOCAB:
        raise ConfigError(f"--size {size}: {spec.vocab_size} codes do not fit the int16 token cache")
    side = resolution // down
    return {
        "size": size,
        "channels": list(spec.channels),
        "vocab_size": spec.vocab_size,
        "embed_dim": spec.embed_dim,
        "downsample": down,
        "resolution": resolution,
        "grid": [side, side],  # tokens per image: grid[0] * grid[1], row-major
        **({"quantizer": "fsq", "levels": list(FSQ_LEVELS[spec.vocab_size])} if quantizer == "fsq" else {}),
    }


@torch.no_grad()
def decode_tokens(model: DiscreteVAE, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Token rows int [N, h*w] (row-major over the grid, as the token cache stores them) -> uint8 images
    [N, 3, R, R] on the CPU, decoded on the model's device."""
    h, w = model.grid
    if tokens.ndim != 2 or tokens.shape[1] != h * w:
        raise ValueError(f"tokens must be [N, {h * w}] for a {h} x {w} grid, got {list(tokens.shape)}")
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= model.vocab_size):
        raise ValueError(f"tokens must be in [0, {model.vocab_size})")
    device = next(model.parameters()).device
    out = [
        to_uint8(model.decode_codes(tokens[i : i + batch_size].to(device).view(-1, h, w)))
        for i in range(0, len(tokens), batch_size)
    ]
    if not out:
        return torch.zeros((0, 3, model.resolution, model.resolution), dtype=torch.uint8)
    return torch.cat(out)


def load_dvae(path: Path | str, flag: str = "--dvae") -> tuple[DiscreteVAE, dict[str, Any]]:
    """A `trainers dvae` checkpoint (file or run directory: its latest) -> (model in eval mode, frozen, on
    the CPU; the checkpoint dict with `path` resolved). Missing, or of another kind: a one-line ConfigError
    naming `flag`."""
    from trainers.runtime.checkpoints import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(path, flag)
    ckpt = load_checkpoint(path, flag, kinds=("dvae",))
    model = DiscreteVAE(ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    ckpt["path"] = str(path.resolve())
    return model.eval().requires_grad_(False), ckpt
