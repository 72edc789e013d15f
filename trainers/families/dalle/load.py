"""`load_dalle(path, ckpt)`: a `trainers dalle` checkpoint as `generate(cond, seed)`, the contract of
`trainers.families.load.load_generator` (so `trainers sample` and `trainers eval` take it through the registry
in trainers/families/registry.py), with the sampler options `guidance`, `temperature`, `top_k`, `top_p`:

    generate, info = load_dalle(path, load_checkpoint(path, kinds=("dalle",)), device="cpu")
    images = generate(cond, seed=0, guidance=3.0, top_k=64)  # float32 [N, D] -> uint8 [N, 3, R, R]

The EMA transformer samples the token grid with its KV cache (trainers.families.dalle.sample.sample_tokens),
then the dVAE the checkpoint records decodes it (trainers.autoencoders.dvae.model.decode_tokens). An option
left at None takes the run's recorded default; `top_k` 0 and `top_p` 1 switch those filters off. Same
checkpoint, cond, seed and options: same pixels on the same device (the Gumbel noise comes from a CPU
generator seeded with `seed`; bf16 autocast on CUDA).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.paths import resolve_recorded
from trainers.engine.family import Generate


def _recorded_dvae(path: Path, ckpt: dict[str, Any], dvae_path: Path | str | None):
    """The frozen dVAE a dalle checkpoint was trained with: the recorded file (or `dvae_path`), refused in
    one line when it is gone or its content is not the recorded digest."""
    from trainers.autoencoders.dvae.encode import dvae_digest
    from trainers.autoencoders.dvae.model import load_dvae

    recorded = ckpt["dvae"]
    where = Path(dvae_path) if dvae_path is not None else Path(recorded["path"])
    if dvae_path is None and not where.exists():
        raise ConfigError(
            f"--checkpoint {path}: the dVAE it was trained with, {where}, is missing (moved or deleted); "
            "put it back there (the tokens mean nothing without it)"
        )
    dvae, dvae_ckpt = load_dvae(where, "--dvae")
    if dvae_digest(dvae_ckpt["path"]) != recorded["digest"]:
        raise ConfigError(
            f"--checkpoint {path}: the dVAE at {dvae_ckpt['path']} is not the one it was trained with (its "
            "content changed since)"
        )
    return dvae, dvae_ckpt


def load_dalle(
    path: Path,
    ckpt: dict[str, Any],
    *,
    device: str = "auto",
    guidance: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    dvae_path: Path | str | None = None,
) -> tuple[Generate, dict[str, Any]]:
    """-> (generate(cond [N, D], seed, guidance=, temperature=, top_k=, top_p=) -> uint8 [N, 3, R, R] on
    the CPU, info: kind, step, config, clip_model, clip_pretrained, resolution, h_dim, size, checkpoint,
    dvae, the sampling defaults, data). Options given here replace the run's defaults; those given to
    `generate` replace these. `dvae_path` overrides the recorded dVAE (the same file, moved)."""
    import torch

    from trainers.autoencoders.dvae.model import decode_tokens
    from trainers.families.dalle.config import sampling_options
    from trainers.families.dalle.model import build_dalle
    from trainers.families.dalle.sample import check_sampling, sample_tokens
    from trainers.runtime.runs import select_device

    if ckpt.get("kind") != "dalle" or "ema" not in ckpt or "dvae" not in ckpt:
        raise ConfigError(
            f"--checkpoint {path}: not a `trainers dalle` checkpoint (kind {ckpt.get('kind')!r})"
        )
    arch = ckpt["arch"]
    torch_device = select_device(device)
    model = build_dalle(arch)
    model.load_state_dict(ckpt["ema"])
    model = model.to(torch_device).eval().requires_grad_(False)
    dvae, dvae_ckpt = _recorded_dvae(path, ckpt, dvae_path)
    if tuple(dvae_ckpt["arch"]["grid"]) != (arch["grid_h"], arch["grid_w"]) or int(
        dvae_ckpt["arch"]["vocab_size"]
    ) != int(arch["vocab"]):
        raise ConfigError(f"--dvae {dvae_ckpt['path']}: its token grid or vocabulary is not the checkpoint's")
    dvae = dvae.to(torch_device)

    def pick(base: dict[str, Any], **given: Any) -> dict[str, Any]:
        """`base` with what is given replacing it (None: not given)."""
        return {**base, **{k: v for k, v in given.items() if v is not None}}

    base = pick(ckpt["config"], guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p)
    defaults = sampling_options(base)
    check_sampling(**defaults)
    amp = torch_device.type == "cuda"

    @torch.no_grad()
    def generate(
        cond: torch.Tensor,
        seed: int,
        guidance: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        cond = torch.as_tensor(cond, dtype=torch.float32)
        if cond.dim() != 2 or cond.shape[1] != arch["cond_dim"]:
            raise ValueError(
                f"cond must be [N, {arch['cond_dim']}] (the run's CLIP dim), got {tuple(cond.shape)}"
            )
        picked = sampling_options(
            pick(base, guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p)
        )
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            tokens = sample_tokens(model, cond.to(torch_device), seed=int(seed), **picked)  # [N, h*w]
        return decode_tokens(dvae, tokens)  # [N, 3, R, R] uint8 on the CPU

    info = {
        "kind": "dalle",
        "step": int(ckpt["step"]),
        "config": ckpt["config"],
        # recorded absolute, but resolved as the other families do, for runs moved with their CLIP files
        "clip_model": resolve_recorded(ckpt["clip"]["model"], path),
        "clip_pretrained": resolve_recorded(ckpt["clip"]["pretrained"], path),
        "resolution": int(dvae_ckpt["arch"]["resolution"]),
        "h_dim": int(arch["cond_dim"]),
        "size": arch["size"],
        "checkpoint": str(path),
        "dvae": dvae_ckpt["path"],
        **defaults,
        "data": ckpt.get("data"),  # the rows it was trained on (trainers.data.loader.LoaderInfo.record)
    }
    return generate, info
