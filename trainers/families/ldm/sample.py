"""`load_ldm_generator(ckpt)`: a `trainers ldm` checkpoint as `generate(cond, seed)`, the contract of
`trainers.families.load.load_generator` (so `trainers eval` can measure it), plus `steps` and `guidance`:

    generate, info = load_ldm_generator(Path("runs/001-ldm/0050000.pt"))
    images = generate(cond, seed=0, steps=50, guidance=3.0)  # float32 [N, D] -> uint8 [N, 3, H, W]

The EMA model integrates the rectified flow from noise with Euler steps
(trainers.families.ldm.model.sample_euler), then the VAE the checkpoint records decodes the latents (in pixel
space they are the images). Same checkpoint, cond, seed, steps and guidance: same pixels (the noise comes from
a CPU generator seeded with `seed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.paths import resolve_recorded
from trainers.engine.family import Generate


def load_ldm_generator(
    ckpt_path: Path | str, *, device: str = "auto", vae_path: Path | str | None = None
) -> tuple[Generate, dict[str, Any]]:
    """-> (generate(cond [N, D], seed, steps=50, guidance=<the run's>) -> uint8 [N, 3, R, R] on the CPU,
    info: kind, step, config, clip_model, clip_pretrained, resolution, h_dim, size, checkpoint, vae, data).
    `vae_path` overrides the VAE checkpoint the LDM checkpoint records (e.g. a run directory moved)."""
    from trainers.runtime.checkpoints import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(ckpt_path, "--checkpoint")
    return load_ldm(
        path, load_checkpoint(path, "--checkpoint", kinds=("ldm",)), device=device, vae_path=vae_path
    )


def load_ldm(
    path: Path, ckpt: dict[str, Any], *, device: str = "auto", vae_path: Path | str | None = None
) -> tuple[Generate, dict[str, Any]]:
    """A loaded `trainers ldm` checkpoint as `generate` and its info (see `load_ldm_generator`)."""
    import torch

    from trainers.families.ldm.model import Dit, sample_euler
    from trainers.families.ldm.space import load_space
    from trainers.runtime.runs import select_device

    if ckpt.get("kind") != "ldm" or "ema" not in ckpt:
        raise ConfigError(f"--checkpoint {path}: not a `trainers ldm` checkpoint (kind {ckpt.get('kind')!r})")
    arch = ckpt["arch"]
    torch_device = select_device(device)
    model = Dit(arch)
    model.load_state_dict(ckpt["ema"])
    model = model.to(torch_device).eval().requires_grad_(False)
    space = arch.get("space", "latent")
    resolution = arch["latent_size"]  # pixel space's; a VAE's checkpoint records its own
    vae, vae_ckpt = load_space(
        space, (vae_path or ckpt["vae"]["path"]) if space == "latent" else None, resolution
    )
    if vae_ckpt["arch"]["latent_channels"] != arch["latent_channels"]:
        raise ConfigError(f"--vae {vae_ckpt['path']}: its latents do not match the checkpoint's")
    vae = vae.to(torch_device)
    default_guidance = float(ckpt["config"].get("guidance", 1.0))
    shape = (arch["latent_channels"], arch["latent_size"], arch["latent_size"])

    @torch.no_grad()
    def generate(
        cond: torch.Tensor, seed: int, steps: int = 50, guidance: float | None = None
    ) -> torch.Tensor:
        cond = torch.as_tensor(cond, dtype=torch.float32)
        if cond.dim() != 2 or cond.shape[1] != arch["h_dim"]:
            raise ValueError(
                f"cond must be [N, {arch['h_dim']}] (the run's CLIP dim), got {tuple(cond.shape)}"
            )
        g = default_guidance if guidance is None else float(guidance)
        noise = torch.randn(
            (cond.shape[0], *shape), generator=torch.Generator().manual_seed(seed)
        )  # [N, C, r, r]
        z = sample_euler(model, noise.to(torch_device), cond.to(torch_device), steps=steps, guidance=g)
        images = vae.decode(z / arch["latent_scale"])  # [N, 3, R, R] about [-1, 1]
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    info = {
        "kind": "ldm",
        "step": int(ckpt["step"]),
        "config": ckpt["config"],
        # older runs recorded the cache's CLIP files relative to where they ran: find them from here
        "clip_model": resolve_recorded(ckpt["clip"]["model"], path),
        "clip_pretrained": resolve_recorded(ckpt["clip"]["pretrained"], path),
        "resolution": vae_ckpt["arch"]["resolution"],
        "h_dim": arch["h_dim"],
        "size": arch["size"],
        "checkpoint": str(path),
        "vae": vae_ckpt["path"],
        "guidance": default_guidance,
        "data": ckpt.get("data"),  # the rows it was trained on (trainers.data.loader.LoaderInfo.record)
    }
    return generate, info
