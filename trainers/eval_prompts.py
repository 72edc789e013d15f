"""The prompts `trainers eval` asks for, and what guessing would score on them: synthetic-world captions
(or a user's file), which of them name a held-out colour-shape pair, and the chance level of the probe's
attribute accuracy on their objects."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

ATTRIBUTES = ("shape", "colour", "size", "position")  # what the probe reads


def synthetic_prompts(n: int, seed: int, max_objects: int = 2) -> list[str]:
    """n synthetic-world captions: one single-object prompt per held-out pair, then 1..max_objects object
    captions over every colour-shape pair (held-out ones included), from a random stream of their own."""
    from pipeline.labels import labels

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
        prompts.append(world.caption([obj], rng))
    all_pairs = [(c, s) for c in world.vocabulary["colour"] for s in world.vocabulary["shape"]]
    while len(prompts) < n:
        prompts.append(world.caption(world.sample_objects(rng, max_objects, pairs=all_pairs), rng))
    return prompts[:n]


def world_max_objects(rows, sample: int = 2000) -> int:
    """The most objects any of (a seeded sample of) the cache's labelled images has; 2 without labels.
    Prompts then ask for no more objects than the generator's world shows."""
    from trainers.embed_rows import labels_of

    pick = np.random.default_rng(0).permutation(len(rows))[:sample]
    counts = [len((labels_of(rows, int(r)) or {}).get("objects") or []) for r in pick]
    return max(counts, default=0) or 2


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
    from pipeline.labels import labels

    return any((o.get("colour"), o.get("shape")) in labels().held_out_pairs for o in objects)


def attribute_chance(targets: list[list[dict[str, str]]]) -> dict[str, float] | None:
    """The expected score of uniform guessing on these prompts' objects under the probe's rule
    (trainers.probe.score_objects): shape, colour, size: 1/|values| per named object; position: k/5 for a
    prompt naming k objects, since any k of the 5 slots count as seen; `all`: the product over the
    attributes an object names. Averaged over objects, as the accuracies are."""
    from trainers.probe import vocabulary

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
