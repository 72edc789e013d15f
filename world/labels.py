"""The labels interface: what the labelled-data metrics know of a dataset's language, and nothing more.

Generic code (attribute precision in the stages, the trainers' eval prompts, the probe, the offline CLIP's
zero-shot tests) asks `labels()` for a vocabulary, a caption of given objects and the objects a caption
states; it never imports a dataset's grammar. The synthetic world is the one implementation
(`world.synth_labels.SynthLabels`, over world/grammar.py); another labelled dataset plugs in
by implementing `Labels` and returning it here.

An object is a dict attribute -> value (`{"shape": "star", "colour": "blue", ...}`); a caption may state
only some attributes of an object.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Protocol

Object = dict[str, str]


class Labels(Protocol):
    vocabulary: dict[str, tuple[str, ...]]  # attribute -> its values, in table order
    held_out_pairs: tuple[tuple[str, str], ...]  # (colour, shape) pairs in captions but in no image

    def caption(self, objects: Sequence[Object], rng: random.Random) -> str:
        """A caption stating every attribute `objects` hold (all, or a partial subset), its wording drawn
        from `rng`."""
        ...

    def parse(self, text: str) -> list[Object]:
        """The objects `text` states, with the attribute values it names (the inverse of `caption`)."""
        ...

    def partial_objects(self, objects: Sequence[Object], rng: random.Random) -> list[Object]:
        """Each object with a random non-empty subset of its attributes: what one partial caption states."""
        ...

    def phrase(self, attribute: str, value: str) -> str:
        """The plainest words for one value alone ("a star", "a red object", "an object on the left")."""
        ...

    def sample_objects(
        self, rng: random.Random, max_objects: int, pairs: Sequence[tuple[str, str]] | None = None
    ) -> list[Object]:
        """1..max_objects objects; (colour, shape) from `pairs` (default: the pairs images show)."""
        ...


@functools.cache
def labels() -> Labels:
    """The labels of the data this project measures on: the synthetic world's."""
    from world.synth_labels import SynthLabels

    return SynthLabels()


def attributes() -> tuple[str, ...]:
    return tuple(labels().vocabulary)


def chance() -> dict[str, float]:
    """Per attribute, the hit rate of a uniformly random value."""
    return {a: 1 / len(values) for a, values in labels().vocabulary.items()}
