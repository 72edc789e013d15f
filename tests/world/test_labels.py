"""The labels interface: the synthetic world implements it, and generic code reaches the world's grammar
only through it."""

from __future__ import annotations

import ast
import random
from pathlib import Path

from world.labels import Labels, attributes, chance, labels

ROOT = Path(__file__).resolve().parents[2]
WORLD = {"world/synth.py", "world/grammar.py", "world/synth_labels.py"}


def test_the_world_captions_what_it_parses():
    world: Labels = labels()
    rng = random.Random(0)
    for _ in range(50):
        objects = world.sample_objects(rng, 2)
        assert world.parse(world.caption(objects, rng)) == objects
    assert attributes() == ("shape", "colour", "size", "position")
    assert chance() == {"shape": 1 / 6, "colour": 1 / 6, "size": 1 / 2, "position": 1 / 5}
    assert world.parse(world.phrase("position", "left")) == [{"position": "left"}]
    held = set(world.held_out_pairs)
    shown = {(o["colour"], o["shape"]) for _ in range(200) for o in world.sample_objects(rng, 2)}
    assert held and not held & shown


def test_only_the_world_imports_its_grammar():
    importers = []
    for path in [*ROOT.glob("pipeline/*.py"), *ROOT.glob("trainers/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.endswith("synth_grammar") for n in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert set(importers) <= WORLD, importers
