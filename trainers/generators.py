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
class Family:
    kind: str  # what its checkpoints record as `kind` (and its `trainers` command)
    config: str  # "module:Class" of its training config
    train: str  # "module:function": (config, progress=callable(n)) -> a result with `.checkpoint`
    load: str  # "module:function": (path, ckpt, *, device, **sampler) -> (generate, info)
    sizes: str  # "module:NAME" of its size registry (name -> size)
    sampler: tuple[str, ...] = ()  # the sampler options its generate takes (trainers sample --steps ...)


FAMILIES: dict[str, Family] = {
    "gan": Family(
        "gan",
        "trainers.train_gan:GanConfig",
        "trainers.train_gan:run_gan",
        "trainers.sample:load_gan",
        "trainers.gan:GAN_SIZES",
    ),
    "ldm": Family(
        "ldm",
        "trainers.train_ldm:LdmConfig",
        "trainers.train_ldm:run_ldm",
        "trainers.ldm_sample:load_ldm",
        "trainers.ldm:LDM_SIZES",
        sampler=("steps", "guidance"),
    ),
}


def member(ref: str) -> Any:
    """`module:name` -> that attribute, imported on first use (families stay cheap to list)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
