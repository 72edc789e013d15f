"""`trainers vae`: a small KL autoencoder (x4 down, 4 latent channels) for the latent diffusion model.

One step, on a batch of real images x in [-1, 1]:

    mean, logvar = E(x);  z = mean + exp(logvar / 2) * eps;  x' = D(z)
    loss = rec(x, x')  +  w_p * CLIP-perceptual(x', x)  +  w_kl * KL(q(z|x) || N(0, I))

with rec the mean |x - x'| (`--recon-loss l1`) or |x - x'|^2 (`mse`).
           [ + w_d * -mean(P(x'))   once step >= disc_start, with --disc-weight w_d > 0 ]

The perceptual term compares the cache's (frozen) CLIP image tower's intermediate features (forward
hooks on a ViT's resblocks or a ModifiedResNet's four stages, unit-normalised per token or position, MSE
averaged over the blocks): offline there is no VGG/LPIPS, and the CLIP the cache was made with is always
at hand. KL is summed over latent elements and divided by the image elements, with w_kl = 1e-6: the
ratio Stable Diffusion's autoencoder uses (it sums both terms), so the latent stays close to an image,
barely regularised.

Optional patch discriminator (`--disc-weight`, off by default): P is a small PatchGAN (real/fake logits
per overlapping patch, about a quarter of the image wide), trained with the hinge loss
mean(relu(1 - P(x))) + mean(relu(1 + P(x'))) after each autoencoder step from step `disc_start` on (the
warm-up: reconstructions should be roughly right before they are made sharp); the autoencoder then
adds w_d times the generator hinge term -mean(P(x')). Fixed weight, no adaptive balancing.

A held-out slice of the cache (`eval_n` images, a fixed seeded choice) is never trained on; the run's
`eval.json` reports the reconstruction PSNR on it (posterior mean, no sampling).

Data-parallel under torchrun, as `trainers gan` (trainers/runtime/distributed.py): `--batch-size` is the
global batch, each rank loads its slice, the posterior noise is drawn for the global batch and sliced, and the
autoencoder's and the discriminator's gradients are averaged over the ranks. Every loss term is a mean
over a batch's rows (the perceptual term included: the frozen CLIP has no batch statistics), so the
averaged gradients are the one-process ones, and the logged losses, averaged over the ranks
(trainers/engine/loop.py), the one-process values. Rank 0 writes and evaluates. `--encode` is one process.

The model is here; the trainer and the run are trainers/autoencoders/vae/train.py.
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
from trainers.runtime.distributed import SINGLE, World


@dataclass(frozen=True)
class VaeSize:
    channels: tuple[int, int, int]  # widths at full, 1/2 and 1/4 resolution
    latent_channels: int = 4
    lr: float = 2e-4  # the default --lr


VAE_SIZES: dict[str, VaeSize] = {
    # the tests' size; 30k parameters. lr by measurement on the 32 px world, 2,000 steps
    # (benchmarks/bench_autoencoders.py): at 2e-4 its reconstructions kept no object
    "tiny": VaeSize((8, 16, 16), lr=2e-3),
    # compare's cpu preset for the LDM: 2,000 steps keep shape 0.78-0.81 of the real images' reading,
    # where tiny keeps 0.49 (0.51-0.68 at 4,000 steps); 250k parameters, a step as cheap as tiny's on CPU
    "mini": VaeSize((16, 32, 64), lr=2e-3),
    "small": VaeSize((32, 64, 128)),  # 32-64 px synthetic world
}
DOWNSAMPLE = 4  # latent side = image side / 4


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return self.skip(x) + y


class AutoencoderKL(nn.Module):
    def __init__(self, arch: dict[str, Any]):
        super().__init__()
        c0, c1, c2 = arch["channels"]
        zc = arch["latent_channels"]
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c0, 3, padding=1),
            ResBlock(c0, c0),
            nn.Conv2d(c0, c0, 3, stride=2, padding=1),  # R/2
            ResBlock(c0, c1),
            nn.Conv2d(c1, c1, 3, stride=2, padding=1),  # R/4
            ResBlock(c1, c2),
            _norm(c2),
            nn.SiLU(),
            nn.Conv2d(c2, 2 * zc, 3, padding=1),  # mean and log-variance
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(zc, c2, 3, padding=1),
            ResBlock(c2, c2),
            nn.Upsample(scale_factor=2, mode="nearest"),  # R/2
            nn.Conv2d(c2, c2, 3, padding=1),
            ResBlock(c2, c1),
            nn.Upsample(scale_factor=2, mode="nearest"),  # R
            nn.Conv2d(c1, c1, 3, padding=1),
            ResBlock(c1, c0),
            _norm(c0),
            nn.SiLU(),
            nn.Conv2d(c0, 3, 3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, R, R] in [-1, 1] -> posterior (mean, logvar), each [B, 4, R/4, R/4]."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, 4, R/4, R/4] -> [B, 3, R, R] (about [-1, 1], not clamped)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, world: World = SINGLE
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, mean, logvar) with z sampled from the posterior. Under torchrun
        (`world`) the noise is drawn for the global batch and this rank's rows kept."""
        mean, logvar = self.encode(x)
        shape = (mean.shape[0] * world.size, *mean.shape[1:])
        eps = world.part(torch.randn(shape, device=mean.device, dtype=mean.dtype))  # [B, 4, R/4, R/4]
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar


def vae_architecture(size: str, resolution: int) -> dict[str, Any]:
    if size not in VAE_SIZES:
        raise ConfigError(f"--size {size}: choose one of {', '.join(VAE_SIZES)}")
    if resolution % DOWNSAMPLE:
        raise ConfigError(f"--cache: images are {resolution}px; the autoencoder needs a multiple of 4")
    spec = VAE_SIZES[size]
    return {
        "size": size,
        "channels": list(spec.channels),
        "latent_channels": spec.latent_channels,
        "resolution": resolution,
    }


class PatchDiscriminator(nn.Module):
    """Real/fake logits per overlapping patch: two stride-2 convolutions then two 3 x 3 ones, so a logit
    sees about 22 px of the image ([B, 3, R, R] -> [B, 1, R/4, R/4])."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),
            _norm(2 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1),
            _norm(4 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClipPerceptual:
    """Distance between CLIP image-tower features of two image batches: hooks on each resblock of a ViT
    (token features [B, L, C]) or on each stage of a ModifiedResNet (feature maps [B, C, H, W])."""

    def __init__(self, clip: Any):
        visual = clip.model.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        self.channel_dim = -1  # ViT tokens: normalise each token's channels
        if blocks is None and all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
            blocks = [getattr(visual, f"layer{i}") for i in range(1, 5)]
            self.channel_dim = 1  # ResNet maps: normalise each position's channels
        if blocks is None:
            raise ConfigError(
                "--cache: the perceptual loss needs an open_clip ViT or ModifiedResNet image tower; "
                f"this cache's is {type(visual).__name__}"
            )
        self.clip, self.blocks = clip, blocks
        device = next(clip.model.parameters()).device
        self.mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)

    def _tokens(self, img: torch.Tensor) -> list[torch.Tensor]:
        size = self.clip.image_size
        x = (img.float() + 1) / 2  # [B, 3, R, R] about [0, 1]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        features: list[torch.Tensor] = []
        # hooks only for this forward: the CLIP may be shared, and must not keep collecting afterwards
        hooks = [b.register_forward_hook(lambda _m, _i, out: features.append(out)) for b in self.blocks]
        try:
            self.clip.model.visual((x - self.mean) / self.std)
        finally:
            for hook in hooks:
                hook.remove()
        return [F.normalize(f.float(), dim=self.channel_dim) for f in features]

    def __call__(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            want = self._tokens(target)
        got = self._tokens(recon)
        return torch.stack([F.mse_loss(g, w) for g, w in zip(got, want, strict=True)]).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, image_elems: int) -> torch.Tensor:
    """KL(N(mean, var) || N(0, I)) summed over latent elements, per image element, mean over the batch."""
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=[1, 2, 3])  # [B]
    return kl.mean() / image_elems


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def reconstruct(model: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """What `--encode` keeps of float [-1, 1] images: decoded posterior means, on the CPU."""
    device = next(model.parameters()).device
    mean, _ = model.encode(images.to(device).float())
    return model.decode(mean).float().cpu()


def load_vae(path: Path | str, flag: str = "--vae") -> tuple[AutoencoderKL, dict[str, Any]]:
    """A `trainers vae` checkpoint (file or run directory) -> (model in eval mode, frozen, CPU; ckpt)."""
    from trainers.runtime.checkpoints import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(path, flag)
    ckpt = load_checkpoint(path, flag, kinds=("vae",))
    model = AutoencoderKL(ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    ckpt["path"] = str(path.resolve())
    return model.eval().requires_grad_(False), ckpt
