"""LAFITE-style conditional StyleGAN2-lite: a generator whose every style sees the text feature, and a
residual discriminator with a per-sample projection of the condition.

    generator      z -> mapping MLP -> w;  h sqrt(D) -> MLP -> c;  every synthesis layer: style s = A([w; c])
                   4x4 constant -> (upsample, modulated 3x3 conv x2, noise, toRGB skip) per resolution
    discriminator  fromRGB -> residual downsampling blocks -> minibatch std -> conv -> FC -> phi(x)
                   logit = linear(phi(x)) + <h, f_s(x)>,   f_s(x) = linear(phi(x)) in CLIP space (L_ConD)

"Lite" against StyleGAN2: bilinear up/down-sampling instead of FIR filters and transposed convs, no path
length regulariser or style mixing, no truncation; equalized learning rate, weight demodulation, noise
inputs, skip toRGBs, residual D and minibatch std are kept. Modulation is applied to the activations
(x * s, shared conv, x * d) rather than as a grouped conv with per-sample weights: the same maths, one
ordinary conv per layer (StyleGAN2-ADA does the same in training, `fused_modconv=False`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers.runtime.distributed import SINGLE


@dataclass(frozen=True)
class GanSize:
    z_dim: int  # latent z
    w_dim: int  # intermediate latent w (mapping output)
    mapping_layers: int  # FC layers in z -> w
    cond_dim: int  # width of MLP(h); the style affines see [w; MLP(h)]
    channel_base: int  # channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int
    d_features: int  # width of the discriminator's phi(x)
    resolutions: tuple[int, ...]  # the image sizes this entry is meant for (others work, untested)
    lr: float = 0.0025  # the default --lr (StyleGAN2's); not part of a checkpoint's architecture

    def channels(self, res: int) -> int:
        return max(1, min(self.channel_base // res, self.channel_max))


# The registry `--size` is checked against (the CLI's help names the entries without importing torch).
# Parameters, G / D: tiny 80k / 75k (32 px, 64-d CLIP); small 5.5M / 5.9M (64 px, 256-d);
# base 26.6M / 24.2M at 128 px, 26.9M / 24.3M at 256 px (512-d).
# fmt: off
GAN_SIZES: dict[str, GanSize] = {
    # the CPU size (and the tests): at 32 px, batch 32, 0.11 s per step on 2 quiet CPU cores (bench_sizes).
    # lr by measurement on the 32 px world, 1,000 steps of batch 32: at 0.0025 shape/colour 0.30/0.69, at
    # 0.01 0.45/0.91 (BENCHMARKS.md, "The GAN: learning shape in the demo's budget")
    "tiny": GanSize(z_dim=32, w_dim=32, mapping_layers=2, cond_dim=32, channel_base=512, channel_max=32,
                    d_features=32, resolutions=(32,), lr=0.01),
    "small": GanSize(z_dim=128, w_dim=128, mapping_layers=4, cond_dim=128, channel_base=8192,
                     channel_max=256, d_features=256, resolutions=(64,)),
    "base": GanSize(z_dim=512, w_dim=512, mapping_layers=8, cond_dim=256, channel_base=16384,
                    channel_max=512, d_features=512, resolutions=(128, 256)),
}
# fmt: on

SQRT2 = math.sqrt(2.0)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU with StyleGAN's gain sqrt(2), which keeps activations at unit variance."""
    return F.leaky_relu(x, 0.2) * SQRT2


class FC(nn.Module):
    """Fully connected layer with equalized learning rate (weights stored N(0,1), scaled at runtime)."""

    def __init__(self, c_in: int, c_out: int, act: bool = False, lr_mul: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / lr_mul)
        self.bias = nn.Parameter(torch.full([c_out], float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(c_in)
        self.bias_gain = lr_mul
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)  # [B, c_out]
        return lrelu(x) if self.act else x


class Conv(nn.Module):
    """Plain conv with equalized learning rate; `down` average-pools 2x first (4x fewer FLOPs than after)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, act: bool = True, bias: bool = True, down: bool = False
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.weight_gain = 1 / math.sqrt(c_in * kernel * kernel)
        self.act, self.down, self.padding = act, down, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)  # [B, c_in, H/2, W/2]
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.padding)  # [B, c_out, H, W]
        return lrelu(x) if self.act else x


class ModulatedConv(nn.Module):
    """StyleGAN2 modulated conv: per-sample input scales s = A(style), demodulation, noise, bias, act."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        style_dim: int,
        resolution: int,
        demodulate: bool = True,
        up: bool = False,
        noise: bool = True,
        act: bool = True,
    ):
        super().__init__()
        self.affine = FC(style_dim, c_in, bias_init=1.0)  # styles start at 1: an identity modulation
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.weight_gain = 1 / math.sqrt(c_in * kernel * kernel)
        self.noise_strength = nn.Parameter(torch.zeros([])) if noise else None
        self.demodulate, self.up, self.act = demodulate, up, act
        self.resolution, self.padding = resolution, kernel // 2

    def forward(
        self, x: torch.Tensor, style: torch.Tensor, generator: torch.Generator | None = None, world=SINGLE
    ):
        s = self.affine(style)  # [B, c_in]
        weight = self.weight * self.weight_gain  # [c_out, c_in, k, k]
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # [B, c_in, R, R]
        x = x * s[:, :, None, None].to(x.dtype)  # [B, c_in, R, R]
        x = F.conv2d(x, weight, padding=self.padding)  # [B, c_out, R, R]
        if self.demodulate:
            # d = 1 / ||w * s|| over (c_in, k, k), per sample and output channel.
            w_sq = weight.float().square().sum(dim=[2, 3])  # [c_out, c_in]
            d = torch.rsqrt(s.float().square() @ w_sq.T + 1e-8)  # [B, c_out]
            x = x * d[:, :, None, None].to(x.dtype)  # [B, c_out, R, R]
        if self.noise_strength is not None:
            shape = (x.shape[0], 1, self.resolution, self.resolution)
            if generator is None:  # training: drawn for the global batch, this rank's rows kept
                global_shape = (shape[0] * world.size, *shape[1:])
                noise = world.part(torch.randn(global_shape, device=x.device, dtype=x.dtype))  # [B, 1, R, R]
            else:  # sampling: draws from the caller's generator, so the global RNG stays untouched
                noise = torch.randn(shape, generator=generator, device=generator.device)
                noise = noise.to(x.device, x.dtype)  # [B, 1, R, R]
            x = x + noise * self.noise_strength.to(x.dtype)
        x = x + self.bias[None, :, None, None].to(x.dtype)
        return lrelu(x) if self.act else x


class SynthesisBlock(nn.Module):
    """One resolution: (upsample + conv0), conv1, and an RGB skip added to the upsampled image so far."""

    def __init__(self, resolution: int, c_in: int, c_out: int, style_dim: int):
        super().__init__()
        self.resolution = resolution
        self.conv0 = None
        if resolution > 4:
            self.conv0 = ModulatedConv(c_in, c_out, 3, style_dim, resolution, up=True)
        self.conv1 = ModulatedConv(c_out, c_out, 3, style_dim, resolution)
        self.to_rgb = ModulatedConv(
            c_out, 3, 1, style_dim, resolution, demodulate=False, noise=False, act=False
        )

    def forward(self, x, img, style, generator=None, world=SINGLE):
        if self.conv0 is not None:
            x = self.conv0(x, style, generator, world)  # [B, c_out, R, R]
        x = self.conv1(x, style, generator, world)  # [B, c_out, R, R]
        rgb = self.to_rgb(x, style)  # [B, 3, R, R]
        if img is not None:
            img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)  # [B, 3, R, R]
            rgb = rgb + img.to(rgb.dtype)
        return x, rgb


def check_resolution(resolution: int) -> None:
    if resolution < 8 or resolution > 1024 or resolution & (resolution - 1):
        raise ValueError(f"image size {resolution}: the GAN needs a power of two between 8 and 1024")


class Generator(nn.Module):
    """G(z, h) -> image in about [-1, 1], [B, 3, R, R]."""

    def __init__(self, size: GanSize, resolution: int, h_dim: int, cond_scale: float = 1.0):
        super().__init__()
        check_resolution(resolution)
        self.size, self.resolution, self.h_dim, self.cond_scale = size, resolution, h_dim, cond_scale
        # Mapping at 1/100 learning rate, as StyleGAN2: w moves slowly relative to the synthesis net.
        layers = [
            FC(size.z_dim if i == 0 else size.w_dim, size.w_dim, act=True, lr_mul=0.01)
            for i in range(size.mapping_layers)
        ]
        self.mapping = nn.Sequential(*layers)
        self.cond_mlp = nn.Sequential(
            FC(h_dim, size.cond_dim, act=True), FC(size.cond_dim, size.cond_dim, act=True)
        )
        style_dim = size.w_dim + size.cond_dim
        self.const = nn.Parameter(torch.randn(size.channels(4), 4, 4))
        self.blocks = nn.ModuleList()
        res, c_in = 4, size.channels(4)
        while res <= resolution:
            self.blocks.append(SynthesisBlock(res, c_in, size.channels(res), style_dim))
            c_in, res = size.channels(res), res * 2

    def styles(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)  # [B, z_dim], unit 2nd moment
        w = self.mapping(z)  # [B, w_dim]
        c = self.cond_mlp(h * self.cond_scale)  # [B, cond_dim]
        return torch.cat([w, c], dim=1)  # [B, w_dim + cond_dim]: every layer's A sees [w; MLP(h)]

    def forward(
        self, z: torch.Tensor, h: torch.Tensor, generator: torch.Generator | None = None, world=SINGLE
    ):
        """`world` (trainers.runtime.distributed): under torchrun, z and h are this rank's rows of the global
        batch,
        and the per-layer noise is drawn for the global batch (the one-process numbers)."""
        style = self.styles(z, h)  # [B, w_dim + cond_dim]
        x = self.const[None].expand(z.shape[0], -1, -1, -1)  # [B, c4, 4, 4]
        img = None
        for block in self.blocks:
            x, img = block(x, img, style, generator, world)  # x [B, c_r, r, r], img [B, 3, r, r]
        return img  # [B, 3, R, R]

    @torch.no_grad()
    def sample(self, h: torch.Tensor, seed: int, chunk: int = 64) -> torch.Tensor:
        """Images for conditions h [N, D] as uint8 [N, 3, R, R] on the CPU; the same (h, seed), the same
        pixels. z and noise come from a CPU generator seeded with `seed` (the global RNG is untouched), in
        chunks of `chunk` rows so memory stays bounded."""
        device = next(self.parameters()).device
        generator = torch.Generator().manual_seed(int(seed))
        h = F.normalize(h.float(), dim=1)  # [N, D]
        z = torch.randn(h.shape[0], self.size.z_dim, generator=generator)  # [N, z_dim]
        out = []
        for i in range(0, h.shape[0], chunk):
            img = self(z[i : i + chunk].to(device), h[i : i + chunk].to(device), generator)  # [n, 3, R, R]
            out.append(to_uint8(img).cpu())
        if not out:
            return torch.zeros(0, 3, self.resolution, self.resolution, dtype=torch.uint8)
        return torch.cat(out)  # [N, 3, R, R]


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, rounding to nearest."""
    return (img.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class DiscriminatorBlock(nn.Module):
    """Residual: two 3x3 convs (the second downsamples) plus a 1x1 downsampling skip, scaled by 1/sqrt(2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv0 = Conv(c_in, c_in, 3)
        self.conv1 = Conv(c_in, c_out, 3, down=True)
        self.skip = Conv(c_in, c_out, 1, act=False, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(x)  # [B, c_out, R/2, R/2]
        x = self.conv1(self.conv0(x))  # [B, c_out, R/2, R/2]
        return (x + y) * (1 / SQRT2)


def minibatch_std(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append the mean std over groups of samples as one more channel (StyleGAN's anti-collapse signal).
    Groups are runs of consecutive samples, so a torchrun rank's slice of the global batch (a multiple of
    the group size) holds whole groups and sees the one-process values."""
    n, c, h, w = x.shape
    g = next(g for g in range(min(group, n), 0, -1) if n % g == 0)  # largest group size dividing the batch
    y = x.float().reshape(-1, g, c, h, w)  # [N/G, G, C, H, W]: each group consecutive samples
    y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1).add(1e-8).sqrt()  # [N/G, C, H, W]
    y = y.mean(dim=[1, 2, 3]).repeat_interleave(g).reshape(-1, 1, 1, 1).expand(n, 1, h, w)  # [N, 1, H, W]
    return torch.cat([x, y.to(x.dtype)], dim=1)  # [N, C + 1, H, W]


class Discriminator(nn.Module):
    """D(x, h) -> (logits [B], f_s [B, D]): logit = linear(phi(x)) + <h, f_s(x)>."""

    def __init__(self, size: GanSize, resolution: int, h_dim: int):
        super().__init__()
        check_resolution(resolution)
        self.from_rgb = Conv(3, size.channels(resolution), 1)
        self.blocks = nn.Sequential(
            *[
                DiscriminatorBlock(size.channels(res), size.channels(res // 2))
                for res in (2**i for i in range(int(math.log2(resolution)), 2, -1))
            ]
        )
        c4 = size.channels(4)
        self.conv = Conv(c4 + 1, c4, 3)
        self.fc = FC(c4 * 16, size.d_features, act=True)
        self.out = FC(size.d_features, 1)
        self.project = FC(size.d_features, h_dim)  # f_s: phi(x) into CLIP's space

    def forward(self, img: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(self.from_rgb(img))  # [B, c4, 4, 4]
        x = self.conv(minibatch_std(x))  # [B, c4, 4, 4]
        phi = self.fc(x.flatten(1))  # [B, d_features]
        f_s = self.project(phi)  # [B, D]
        logits = self.out(phi).squeeze(1) + (f_s * h.to(f_s.dtype)).sum(dim=1)  # [B]
        return logits.float(), f_s.float()


def build_models(arch: dict) -> tuple[Generator, Discriminator]:
    """Models from an `architecture()` dict: a checkpoint rebuilds what it was trained with, even if the
    registry entry has changed since."""
    fields = {k: arch[k] for k in GanSize.__dataclass_fields__ if k != "lr"}
    size = GanSize(**{**fields, "resolutions": tuple(fields["resolutions"])})
    generator = Generator(size, arch["resolution"], arch["h_dim"], arch.get("cond_scale", 1.0))
    return generator, Discriminator(size, arch["resolution"], arch["h_dim"])


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_size_fits(size_name: str, resolution: int) -> None:
    """Warn when the cache's images are larger than the size is meant for: a step's cost grows with the
    pixels (README, "What a step costs"), and a user on 256 px images from `pipeline embed`'s default
    --image-size got hours where the size's own resolution takes minutes."""
    import warnings

    meant = max(GAN_SIZES[size_name].resolutions)
    if resolution > meant:
        warnings.warn(
            f"--size {size_name} is meant for {meant} px images; the cache's are {resolution} px, so each "
            f"step costs about {(resolution / meant) ** 2:.0f}x more (embed with --image-size {meant}, or "
            "see the README's cost per step)",
            stacklevel=2,
        )


def architecture(size_name: str, resolution: int, h_dim: int) -> dict:
    """What a checkpoint needs to rebuild the models (plain types: loads with weights_only=True)."""
    size = asdict(GAN_SIZES[size_name])
    del size["lr"]  # training, not the models: the run's config.json records the lr it used
    return {
        "size": size_name,
        "resolution": resolution,
        "h_dim": h_dim,
        # unit-norm conditions times sqrt(D): entries of unit second moment, as z's (and StyleGAN2-ADA's
        # normalised class embedding). Unscaled, a 512-d text feature reached the styles about 20x smaller
        # than w, and shape was learnt slowly (BENCHMARKS.md); checkpoints made before it keep 1
        "cond_scale": math.sqrt(h_dim),
        **size,
        "resolutions": list(size["resolutions"]),
    }
