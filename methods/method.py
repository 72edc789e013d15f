"""A pseudo-feature method, as `pipeline optimize --method NAME` runs it (methods/registry.py lists them).

A method turns a batch of image features f [B, D] (unit-norm, fp32) into pseudo text features: its starting
point h0 and its output h, both [B, D] and unit-norm, and the batch's final proximity term (0 for a method
that does not refine). It may read each image's k retrieved caption neighbours (`needs_neighbours`: the
retrieve step must exist) and per-image Gaussian noise (`needs_noise`: drawn by the stage, seeded per
shard). `keyed` names the `pipeline optimize` options that change its output: they key its shards, so
changing one remakes them and changing any other does not.

Light on purpose: `pipeline optimize --help` reads the registry, so a method module imports torch inside
its functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Batch:
    """One batch's inputs besides f: what the method asked for, on f's device."""

    t_k: Any = None  # [B, K, D] the neighbours' caption features (needs_neighbours)
    sims: Any = None  # [B, K] their retrieval similarities
    valid: Any = None  # [B, K] bool: False for missing or unusable neighbours
    noise: Any = None  # [B, D] standard Gaussian noise (needs_noise)


@dataclass(frozen=True)
class Method:
    name: str  # what --method takes, and what the shards record
    summary: str  # one line for --help
    keyed: tuple[str, ...]  # the OptimizeConfig fields that change its output (besides `method`)
    # (f [B, D], batch, hp) -> (h0 [B, D], h [B, D], proximity): h is h0 (the same tensor) when not refined
    features: Callable[..., tuple[Any, Any, float]]
    needs_neighbours: bool = True
    needs_noise: bool = False
