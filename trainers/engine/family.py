"""What a generator family is to the trainers that work with every family (`trainers sample`, `trainers eval`,
`trainers compare`). Each family declares its record in its folder (`trainers/families/{kind}/family.py`),
and trainers/families/registry.py lists them.

    family = FAMILIES["gan"]
    config = member(family.config)(cache=..., out=...)       # its training config class
    checkpoint = member(family.train)(config, progress=tick).checkpoint
    generate, info = member(family.load)(path, ckpt, device="cpu")   # trainers.families.load's contract

The code is named as "module:name" and imported on first use, so the families stay cheap to list (`--help`
reads them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainers.autoencoders.autoencoder import RUN_UNKEYED, Autoencoder

# A generator config's fields that `trainers compare` does not key (each family adds its own).
GENERATOR_UNKEYED = RUN_UNKEYED + (
    "workers",
    "sample_every",
    "samples_per_prompt",
    "resume",
    "init",
    "compile",
)


@dataclass(frozen=True)
class Family:
    kind: str  # what its checkpoints record as `kind` (and its `trainers` command)
    config: str  # "module:Class" of its training config
    train: str  # "module:function": (config, progress=callable(n)) -> a result with `.checkpoint`
    load: str  # "module:function": (path, ckpt, *, device, **sampler) -> (generate, info)
    sizes: str  # "module:NAME" of its size registry (name -> size)
    # `trainers compare`'s budget of one run per preset (smoke, cpu, gpu): its config's fields
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    sampler: tuple[str, ...] = ()  # the sampler options its generate takes (trainers sample --steps ...)
    autoencoder: Autoencoder | None = None  # the autoencoder it is trained in, if any
    unkeyed: tuple[str, ...] = GENERATOR_UNKEYED  # its config's fields `trainers compare` does not key
    compare_fields: tuple[str, ...] = ()  # CompareConfig fields its config takes as they are (ldm: space)
    # the maths of its model and training: a change that alters what a run with the same config learns
    # bumps it, so `trainers compare` redoes the runs made before (a committed run is keyed on it)
    version: str = "1"


Generate = Callable[..., Any]  # (cond: Tensor [N, D] float32, seed: int) -> uint8 Tensor [N, 3, H, W]
