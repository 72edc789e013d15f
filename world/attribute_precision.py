"""Attribute precision: the one definition every stage and report uses on labelled data (`caption_objects`:
what a caption states, read through world/labels.py; `target_object`: what an image holds).

How well does a caption state an image's object? `pipeline retrieve` (precision@1 and @k of the retrieved
captions), `pipeline optimize` (the nearest real caption of h0 and of the output), `trainers compare
--features-only` (the nearest real caption of each conditioning feature) all call `attribute_precision`;
`trainers eval` scores the probe's reading of a generated image with the same hit rule (`object_hits`).

Definition. The target is the image's *first* labelled object (drawing order; the image's own caption
names it first). Of the objects a caption states (`caption_objects`), the one compared is the one
stating the most of the target's values (an unstated attribute never agrees), the first mentioned on
ties. An attribute is a hit when that object states the target's value; an attribute the caption does not
state is a miss, and a caption with no parsable object misses every attribute (a generator cannot
follow what the text does not say). `object` is a hit when every attribute is. Each figure is the share of
hits over the scored (target, caption) pairs; `mean` is the mean of the four attribute figures. Pairs
without a target (unlabelled image) or without a caption (None) are not scored. Chance, for a caption
stating a uniformly random object: shape 1/6, colour 1/6, size 1/2, position 1/5.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from world.labels import attributes, chance, labels

ATTRIBUTES: tuple[str, ...] = attributes()  # shape, colour, size, position in the synthetic world
FIGURES: tuple[str, ...] = (*ATTRIBUTES, "object", "mean")
DEFINITION = (
    "target = the image's first labelled object; compared caption object = the parsed object stating the "
    "most of its values (first mentioned on ties); an attribute the caption does not state is a miss, an "
    "unparsable caption misses all; 'object' = all four right; 'mean' = mean of the four attributes"
)
CHANCE = chance()  # shape 1/6, colour 1/6, size 1/2, position 1/5 in the synthetic world

Object = dict[str, str]


def caption_objects(text: str) -> list[Object]:
    """The objects a caption states, with the attribute values it names (world.labels' reading)."""
    return labels().parse(text)


def target_object(labels: str | dict[str, Any] | None) -> Object | None:
    """The first object of an image's labels (the synthetic world's `{key}.json`, as text or parsed)."""
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except ValueError:
            return None
    objects = labels.get("objects") if isinstance(labels, dict) else None
    first = objects[0] if isinstance(objects, list) and objects else None
    return first if isinstance(first, dict) else None


def matching_object(target: Object, objects: Sequence[Object]) -> Object | None:
    """The caption object stating the most of `target`'s values, the first mentioned on ties (None: [])."""
    best, best_score = None, -1
    for obj in objects:
        score = sum(a in obj and obj[a] == target.get(a) for a in ATTRIBUTES)
        if score > best_score:
            best, best_score = obj, score
    return best


def object_hits(target: Object, described: Object | None) -> dict[str, bool]:
    """Per attribute `target` names: does `described` state the same value (unstated: miss)? `object`:
    all of them. Labels name all four; a prompt may name fewer, and only those are scored."""
    described = described or {}
    hits = {a: a in described and described[a] == target[a] for a in ATTRIBUTES if a in target}
    hits["object"] = all(hits.values())
    return hits


def attribute_precision(
    pairs: Iterable[tuple[Object | None, Sequence[Object] | None]],
) -> dict[str, float | int] | None:
    """Attribute precision of captions against their images' targets (see the module docstring).

    `pairs`: (target object, the caption's parsed objects) per scored caption; a None target or caption
    is skipped, an empty object list is an unparsable caption. Returns the share of hits for each
    attribute, `object` and `mean`, rounded to 6 places, plus `n` (pairs scored); None when none was.
    """
    hits: Counter = Counter()
    counts: Counter = Counter()
    n = 0
    for target, objects in pairs:
        if target is None or objects is None:
            continue
        n += 1
        for name, hit in object_hits(target, matching_object(target, objects)).items():
            counts[name] += 1
            hits[name] += hit
    if not n:
        return None
    out: dict[str, Any] = {
        name: round(hits[name] / counts[name], 6) if counts[name] else None
        for name in (*ATTRIBUTES, "object")
    }
    stated = [out[a] for a in ATTRIBUTES if out[a] is not None]
    out["mean"] = round(sum(stated) / len(stated), 6) if stated else None
    out["n"] = n
    return out
