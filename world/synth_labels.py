"""The synthetic world's implementation of the labels interface (world/labels.py), over its grammar."""

from __future__ import annotations

import random
from collections.abc import Sequence

from world import grammar


class SynthLabels:
    vocabulary = {
        "shape": grammar.SHAPES,
        "colour": grammar.COLOURS,
        "size": grammar.SIZES,
        "position": grammar.POSITIONS,
    }
    held_out_pairs = grammar.HELD_OUT_PAIRS

    def caption(self, objects: Sequence[dict[str, str]], rng: random.Random) -> str:
        return grammar.make_caption(objects, rng)

    def partial_objects(self, objects: Sequence[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
        return grammar.partial_objects(objects, rng)

    def parse(self, text: str) -> list[dict[str, str]]:
        return grammar.parse_caption(text)

    def phrase(self, attribute: str, value: str) -> str:
        if attribute == "shape":
            return f"a {value}"
        if attribute == "position":
            return f"an object {grammar.SYNONYMS['position'][value][0]}"
        return f"a {value} object"

    def sample_objects(
        self, rng: random.Random, max_objects: int, pairs: Sequence[tuple[str, str]] | None = None
    ) -> list[dict[str, str]]:
        return grammar.sample_objects(rng, max_objects, pairs=grammar.IMAGE_PAIRS if pairs is None else pairs)
