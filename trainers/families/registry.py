"""The generator families, by the `kind` their checkpoints record: the one registry that `trainers sample`,
`trainers eval` and `trainers compare` look a generator up in (trainers/engine/family.py says what a
family is). Adding a family is its folder (with its `family.py` record) and one line here."""

from __future__ import annotations

from trainers.engine.family import Family
from trainers.families.dalle.family import DALLE
from trainers.families.gan.family import GAN
from trainers.families.ldm.family import LDM

FAMILIES: dict[str, Family] = {f.kind: f for f in (GAN, LDM, DALLE)}


def autoencoder_kinds() -> tuple[str, ...]:
    return tuple(f.autoencoder.kind for f in FAMILIES.values() if f.autoencoder is not None)


def unkeyed(kind: str) -> tuple[str, ...]:
    """The config fields `trainers compare` does not key, of a family or of an autoencoder."""
    if kind in FAMILIES:
        return FAMILIES[kind].unkeyed
    return next(
        f.autoencoder.unkeyed for f in FAMILIES.values() if f.autoencoder and f.autoencoder.kind == kind
    )
