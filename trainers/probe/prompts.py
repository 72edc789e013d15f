"""The prompts `trainers eval` asks for, and what guessing would score on them: synthetic-world captions,
the cache's own captions or a user's file; whether the cache's labels let the probe measure attributes at
all (`world_labels`); which prompts name a held-out colour-shape pair, and the chance level of the probe's
attribute accuracy on their objects."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError

ATTRIBUTES = ("shape", "colour", "size", "position")  # what the probe reads
CAPTION_STREAM = 12  # numpy stream id of the draw of the cache's captions as prompts (real images: 11)


def synthetic_prompts(n: int, seed: int, max_objects: int = 2, partial: bool = False) -> list[str]:
    """n synthetic-world captions: one single-object prompt per held-out pair, then 1..max_objects object
    captions over every colour-shape pair (held-out ones included), from a random stream of their own.
    `partial` (a partial-caption world): each object names a random 1-4 of its attributes, as the world's
    captions do, the held-out pair prompts always their colour and shape."""
    from world.labels import labels

    world = labels()
    rng = random.Random(f"trainers/eval/prompts/{seed}")
    prompts = []
    for colour, shape in world.held_out_pairs:
        obj = {
            "shape": shape,
            "colour": colour,
            "size": rng.choice(world.vocabulary["size"]),
            "position": rng.choice(world.vocabulary["position"]),
        }
        if partial:
            obj = {"shape": shape, "colour": colour, **world.partial_objects([obj], rng)[0]}
        prompts.append(world.caption([obj], rng))
    all_pairs = [(c, s) for c in world.vocabulary["colour"] for s in world.vocabulary["shape"]]
    while len(prompts) < n:
        objects = world.sample_objects(rng, max_objects, pairs=all_pairs)
        prompts.append(world.caption(world.partial_objects(objects, rng) if partial else objects, rng))
    return prompts[:n]


def world_labels(rows, sample: int = 2000) -> dict[str, Any]:
    """What a seeded sample of the cache's rows says about synthetic-world labels: `sampled` rows,
    `labelled` ones (labels naming objects, each with every attribute the probe reads, in the world's
    vocabulary), `max_objects` (the most objects a labelled row has; 0 without) and `measurable`: most
    sampled rows are labelled, so the probe (trained on rendered world images) and prompts in the world's
    grammar describe what the generator was trained on. Elsewhere (a user's own images) attribute accuracy
    would score the probe's reading of pictures it was never made for. `partial`: most labelled rows list
    several captions (`captions`), as the partial-caption world's do, so prompts should be partial too."""
    from feature_cache.embed_rows import labels_of
    from world.labels import labels

    vocab = labels().vocabulary
    pick = np.random.default_rng(0).permutation(len(rows))[:sample]
    counts, partial = [], 0
    for r in pick:
        labelled_row = labels_of(rows, int(r)) or {}
        partial += isinstance(labelled_row.get("captions"), list)
        objects = labelled_row.get("objects")
        world = (
            isinstance(objects, list)
            and objects
            and all(isinstance(o, dict) and all(o.get(a) in vocab[a] for a in ATTRIBUTES) for o in objects)
        )
        counts.append(len(objects) if world else 0)
    labelled = sum(c > 0 for c in counts)
    return {
        "sampled": len(counts),
        "labelled": labelled,
        "max_objects": max(counts, default=0),
        "measurable": labelled > 0 and 2 * labelled >= len(counts),
        "partial": labelled > 0 and 2 * partial >= labelled,
    }


def default_prompts(rows, n: int, seed: int, world: dict[str, Any]) -> tuple[list[str], str, int | None]:
    """(unique prompts, their source, their most objects if synthetic) when no --prompts file is given: up
    to min(n, 1000) of them.

    A labelled world cache gets synthetic-world captions with as many objects as its images show (the
    probe can score them). Any other cache gets its own captions, a seeded draw of distinct ones: prompts
    like the data the generator learnt from, and what `clip_score_real` is measured on, so FID and CLIP
    score read on the same footing. A cache without captions gets synthetic captions as placeholders (FID
    and CLIP score need some text), and its source says so."""
    count = min(n, 1000)
    if world["measurable"]:
        max_objects, partial = world["max_objects"], world.get("partial", False)
        named = ", each naming 1-4 attributes: as the cache's captions" if partial else ""
        return (
            synthetic_prompts(count, seed, max_objects, partial),
            f"synthetic (seed {seed}, 1-{max_objects} objects: as the cache's images{named})",
            max_objects,
        )
    captions, seen = [], set()
    for r in np.random.default_rng([seed, CAPTION_STREAM]).permutation(len(rows)):
        caption = rows.captions[int(r)]
        text = caption.strip() if isinstance(caption, str) else ""
        if text and text not in seen:
            seen.add(text)
            captions.append(text)
            if len(captions) == count:
                break
    if captions:
        return captions, f"the cache's captions (seed {seed}, {len(captions)} distinct)", None
    return (
        synthetic_prompts(count, seed, 2),
        f"synthetic (seed {seed}, 1-2 objects): placeholders, the cache has no captions or world labels",
        2,
    )


def read_prompts(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompts {path}: cannot read it ({e})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in it (one per line)")
    return prompts


def names_held_out_pair(objects: list[dict[str, str]]) -> bool:
    from world.labels import labels

    return any((o.get("colour"), o.get("shape")) in labels().held_out_pairs for o in objects)


def attribute_chance(targets: list[list[dict[str, str]]]) -> dict[str, float] | None:
    """Chance, the one definition: the expected score of uniform guessing on these prompts' objects under
    the probe's rule (trainers.probe.probe.score_objects), averaged over objects as the accuracies are. Shape,
    colour, size: 1/|values| per named object. Position: k/5 for an object of a prompt naming k objects,
    since the probe's k most confident of the 5 slots count as seen and a uniform guess of k slots holds
    the named one with probability k/5. `all`: the product over the attributes an object names.

    So position chance depends on how many objects the prompts name (`objects_named`, eval.json's
    `prompts.by_objects`): 0.20 for single-object prompts; 1/3 for as many one- as two-object prompts
    (per pair of prompts, one object at 1/5 and two at 2/5: (0.2 + 0.8) / 3)."""
    from trainers.probe.probe import vocabulary

    vocab = vocabulary()
    scores: dict[str, list[float]] = {a: [] for a in (*ATTRIBUTES, "all")}
    for objects in targets:
        for obj in objects:
            guesses = {
                a: min(1.0, len(objects) / len(vocab[a])) if a == "position" else 1.0 / len(vocab[a])
                for a in ATTRIBUTES
                if obj.get(a) in vocab[a]
            }
            guesses["all"] = float(np.prod(list(guesses.values())))
            for a, value in guesses.items():
                scores[a].append(value)
    chance = {a: round(float(np.mean(v)), 4) for a, v in scores.items() if v}
    return chance or None


def attributes_named(targets: list[list[dict[str, str]]]) -> dict[str, int]:
    """How many prompts name each attribute (of any of their objects), and how many name k attributes
    (`k_attributes`, the most any of their objects names): accuracy on an attribute is counted only on the
    prompts that name it."""
    counts: Counter = Counter()
    most: Counter = Counter()
    for objects in targets:
        named = [{a for a in ATTRIBUTES if a in obj} for obj in objects]
        counts.update(set().union(*named) if named else set())
        most[max((len(n) for n in named), default=0)] += 1
    return {**{a: counts[a] for a in ATTRIBUTES}, "k_attributes": {str(k): most[k] for k in sorted(most)}}


def objects_named(targets: list[list[dict[str, str]]]) -> dict[str, int]:
    """How many prompts name k objects, by k (a string, as JSON keys are): the mix position chance
    depends on."""
    counts = Counter(len(objects) for objects in targets)
    return {str(k): counts[k] for k in sorted(counts)}
