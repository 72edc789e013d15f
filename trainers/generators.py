"""The generator families, by the `kind` their checkpoints record: the one registry that `trainers
sample`, `trainers eval` and `trainers compare` look a generator up in. Adding a family is one entry.

    family = FAMILIES["gan"]
    config = member(family.config)(cache=..., out=...)       # its training config class
    checkpoint = member(family.train)(config, progress=tick).checkpoint
    generate, info = member(family.load)(path, ckpt, device="cpu")   # trainers.sample's contract
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Autoencoder:
    """The image autoencoder a family works in (ldm: the KL VAE's latents; dalle: the dVAE's tokens), which
    `trainers compare` trains once and shares by every run."""

    kind: str  # its checkpoints' kind, its command and its compare unit (and folder)
    title: str  # how messages name it
    field: str  # the family config's field that names its checkpoint
    config: str  # "module:Class" of its training config
    train: str  # "module:function": (config, progress) -> a result with `.checkpoint`, `.run_dir`, `.psnr`
    encode: str  # "module:function": (cache, checkpoint, *, batch_size, device) -> its per-shard cache
    sizes: str  # "module:NAME" of its size registry


@dataclass(frozen=True)
class Family:
    kind: str  # what its checkpoints record as `kind` (and its `trainers` command)
    config: str  # "module:Class" of its training config
    train: str  # "module:function": (config, progress=callable(n)) -> a result with `.checkpoint`
    load: str  # "module:function": (path, ckpt, *, device, **sampler) -> (generate, info)
    sizes: str  # "module:NAME" of its size registry (name -> size)
    sampler: tuple[str, ...] = ()  # the sampler options its generate takes (trainers sample --steps ...)
    autoencoder: Autoencoder | None = None  # the autoencoder it is trained in, if any
    # the maths of its model and training: a change that alters what a run with the same config learns
    # bumps it, so `trainers compare` redoes the runs made before (a committed run is keyed on it)
    version: str = "1"


FAMILIES: dict[str, Family] = {
    "gan": Family(
        "gan",
        "trainers.gan_config:GanConfig",
        "trainers.train_gan:run_gan",
        "trainers.sample:load_gan",
        "trainers.gan:GAN_SIZES",
        # 2: the condition scaled to unit second moment (trainers.gan architecture's cond_scale); 3: the tiny
        # size's lr 0.01
        version="3",
    ),
    "ldm": Family(
        "ldm",
        "trainers.ldm_config:LdmConfig",
        "trainers.train_ldm:run_ldm",
        "trainers.ldm_sample:load_ldm",
        "trainers.ldm:LDM_SIZES",
        sampler=("steps", "guidance"),
        autoencoder=Autoencoder(
            "vae",
            "VAE",
            "vae",
            "trainers.vae_config:VaeConfig",
            "trainers.vae:run_vae",
            "trainers.latents:encode_latents",
            "trainers.vae:VAE_SIZES",
        ),
        version="2",  # 2: the condition scaled to unit RMS (cond_scale), the tiny size's lr 1e-3
    ),
    "dalle": Family(
        "dalle",
        "trainers.dalle_config:DalleConfig",
        "trainers.train_dalle:run_dalle",
        "trainers.dalle_load:load_dalle",
        "trainers.dalle:DALLE_SIZES",
        sampler=("guidance", "temperature", "top_k", "top_p"),
        autoencoder=Autoencoder(
            "dvae",
            "dVAE",
            "dvae",
            "trainers.dvae_config:DvaeConfig",
            "trainers.train_dvae:run_dvae",
            "trainers.tokens:encode_tokens",
            "trainers.dvae:DVAE_SIZES",
        ),
    ),
}


def autoencoder_kinds() -> tuple[str, ...]:
    return tuple(f.autoencoder.kind for f in FAMILIES.values() if f.autoencoder is not None)


def member(ref: str) -> Any:
    """`module:name` -> that attribute, imported on first use (families stay cheap to list)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
