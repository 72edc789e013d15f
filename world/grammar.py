"""The synthetic world's language: its vocabulary, the caption templates and their exact inverse.

Captions are templated with synonyms and varied word order, and `parse_caption` inverts every template
exactly, so retrieval precision and attribute accuracy can be measured without a human in the loop. A
caption states what its objects hold: every attribute for a full object, or the named subset of a partial
one (`partial_objects`), as real captions leave out most of what an image shows. A few
(colour, shape) pairs never appear in an image but do appear in the caption corpus (`HELD_OUT_PAIRS`).
The renderer and the `pipeline synth` stage are in world/synth.py; generic stages read captions
through the labels interface (world/labels.py, implemented by world/synth_labels.py), not through
this module.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")


COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")


SIZES: tuple[str, ...] = ("small", "large")


POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")


ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")


# Words a caption may use for each attribute value. Position phrases are the trailing forms
# ("a red disc on the left"); POSITION_HEADINGS are the noun forms used as a heading ("left side: ...").
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc", "round dot"),
        "square": ("square", "box", "block"),
        "triangle": ("triangle", "wedge", "three-sided shape"),
        "star": ("star", "five-pointed star", "star shape"),
        "cross": ("cross", "plus sign", "plus shape"),
        "diamond": ("diamond", "rhombus", "lozenge"),
    },
    "colour": {
        "red": ("red", "crimson", "scarlet"),
        "orange": ("orange", "tangerine", "amber"),
        "yellow": ("yellow", "golden", "lemon"),
        "green": ("green", "emerald", "jade"),
        "blue": ("blue", "azure", "cobalt"),
        "purple": ("purple", "violet", "plum"),
    },
    "size": {
        "small": ("small", "tiny", "little"),
        "large": ("large", "big", "huge"),
    },
    "position": {
        "left": ("on the left", "at the left", "on the left side", "to the left"),
        "right": ("on the right", "at the right", "on the right side", "to the right"),
        "top": ("at the top", "on top", "near the top", "in the upper part"),
        "bottom": ("at the bottom", "near the bottom", "in the lower part", "down below"),
        "centre": ("in the centre", "in the center", "in the middle", "at the centre"),
    },
}


POSITION_HEADINGS: dict[str, tuple[str, ...]] = {
    "left": ("left side", "left"),
    "right": ("right side", "right"),
    "top": ("top", "upper part"),
    "bottom": ("bottom", "lower part"),
    "centre": ("centre", "center", "middle"),
}


# Single head words, so a caption written by hand ("a red star, upper left") still yields partial labels.
POSITION_WORDS: dict[str, str] = {
    "left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
    "below": "bottom", "centre": "centre", "center": "centre", "middle": "centre",
}  # fmt: skip


# Colour/shape pairs that no image contains but the caption corpus does: a text-only retrieval bank
# always holds concepts the images lack. Spread so every colour keeps 5 shapes in the images and every
# shape keeps at least 5 colours.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("yellow", "cross"),
    ("blue", "star"),
    ("purple", "circle"),
)


IMAGE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS
)


# Object phrase templates. "{a}" becomes "a"/"an"; each phrase names every attribute exactly once and is
# contiguous, which is what lets parse_caption split a two-object caption without reading the grammar.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {size} {colour} {shape} {pos}",
    "{where}: one {size} {colour} {shape}",
    "there is {a} {size} {colour} {shape} {pos}",
    "{pos}, {a} {size} {colour} {shape}",
    "{a} {colour} {shape}, {size}, {pos}",
    "{a} {size} {shape} in {colour} {pos}",
    "{a} {size} {colour} {shape} sits {pos}",
    "{pos} there is {a} {size} {colour} {shape}",
)


_NOUN_PHRASE_TEMPLATES = frozenset({0, 4, 5})  # these may follow "a picture of"


CAPTION_PREFIXES: tuple[str, ...] = ("a picture of ", "an image showing ", "a drawing of ")


CAPTION_JOINERS: tuple[str, ...] = (" and ", ", and ", "; and ", " and also ")


_ARTICLE = "\x01"


# Object phrases for a partial object: (template, the attributes it needs). A missing attribute's slot is
# left empty (and its comma dropped); an unnamed shape becomes a plain noun. Only the first four may
# follow "a picture of" (`_NOUN_PHRASE_PARTIAL`).
PARTIAL_TEMPLATES: tuple[tuple[str, frozenset[str]], ...] = (
    ("{a} {size} {colour} {noun} {pos}", frozenset()),
    ("{a} {colour} {noun}, {size}, {pos}", frozenset()),
    ("{a} {size} {noun} in {colour} {pos}", frozenset({"colour"})),
    ("there is {a} {size} {colour} {noun} {pos}", frozenset()),
    ("{pos}, {a} {size} {colour} {noun}", frozenset({"position"})),
    ("{where}: one {size} {colour} {noun}", frozenset({"position"})),
    ("{a} {size} {colour} {noun} sits {pos}", frozenset({"position"})),
    ("{pos} there is {a} {size} {colour} {noun}", frozenset({"position"})),
)


_NOUN_PHRASE_PARTIAL = frozenset({0, 1, 2})


PLAIN_NOUNS: tuple[str, ...] = ("object", "shape", "thing")  # for an object whose shape is not named


def partial_objects(objects: Sequence[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    """Each object with a random non-empty subset of its attributes: how many (1 to all) uniformly, then
    which. What one partial caption of an image states."""
    partial = []
    for obj in objects:
        named = rng.sample(sorted(obj), rng.randint(1, len(obj)))
        partial.append({a: v for a, v in obj.items() if a in named})
    return partial


def make_caption(objects: Sequence[dict[str, str]], rng: random.Random) -> str:
    """A templated caption stating what `objects` hold, with a random synonym per value and a random
    template: OBJECT_TEMPLATES when every object names all four attributes, else PARTIAL_TEMPLATES."""
    if not all(set(ATTRIBUTES) <= set(obj) for obj in objects):
        return _partial_caption(objects, rng)
    templates = [rng.randrange(len(OBJECT_TEMPLATES)) for _ in objects]
    phrases = [_object_phrase(o, OBJECT_TEMPLATES[t], rng) for o, t in zip(objects, templates, strict=True)]
    return _joined(phrases, all(t in _NOUN_PHRASE_TEMPLATES for t in templates), rng)


def _joined(phrases: list[str], noun_phrases: bool, rng: random.Random) -> str:
    """The object phrases joined into one caption: maybe "a picture of " first (when every phrase is a
    noun phrase), articles fitted, maybe capitalised."""
    text = rng.choice(CAPTION_JOINERS).join(phrases)
    if noun_phrases and rng.random() < 0.4:
        text = rng.choice(CAPTION_PREFIXES) + text
    text = re.sub(_ARTICLE + r" (\w)", _article, text)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text


def _article(match: re.Match[str]) -> str:
    return ("an " if match.group(1) in "aeiou" else "a ") + match.group(1)


def _object_phrase(obj: dict[str, str], template: str, rng: random.Random) -> str:
    return template.format(
        a=_ARTICLE,
        size=rng.choice(SYNONYMS["size"][obj["size"]]),
        colour=rng.choice(SYNONYMS["colour"][obj["colour"]]),
        shape=rng.choice(SYNONYMS["shape"][obj["shape"]]),
        pos=rng.choice(SYNONYMS["position"][obj["position"]]),
        where=rng.choice(POSITION_HEADINGS[obj["position"]]),
    )


def _partial_caption(objects: Sequence[dict[str, str]], rng: random.Random) -> str:
    phrases, templates = [], []
    for obj in objects:
        fits = [i for i, (_, needs) in enumerate(PARTIAL_TEMPLATES) if needs <= set(obj)]
        templates.append(rng.choice(fits))
        phrases.append(_partial_phrase(obj, PARTIAL_TEMPLATES[templates[-1]][0], rng))
    return _joined(phrases, all(t in _NOUN_PHRASE_PARTIAL for t in templates), rng)


def _partial_phrase(obj: dict[str, str], template: str, rng: random.Random) -> str:
    def word(attribute: str, table: dict[str, tuple[str, ...]]) -> str:
        return rng.choice(table[obj[attribute]]) if attribute in obj else ""

    phrase = template.format(
        a=_ARTICLE,
        size=word("size", SYNONYMS["size"]),
        colour=word("colour", SYNONYMS["colour"]),
        noun=word("shape", SYNONYMS["shape"]) or rng.choice(PLAIN_NOUNS),
        pos=word("position", SYNONYMS["position"]),
        where=word("position", POSITION_HEADINGS),
    )
    phrase = re.sub(r" +", " ", phrase)
    phrase = re.sub(r" ?,(?: ?,)+", ",", phrase)  # an empty slot between two commas
    return re.sub(r" ,", ",", phrase).strip(" ,")


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _build_lexicon() -> dict[tuple[str, ...], tuple[str, str]]:
    lexicon: dict[tuple[str, ...], tuple[str, str]] = {}
    entries = [(attr, value, words) for attr, table in SYNONYMS.items() for value, words in table.items()]
    entries += [("position", value, words) for value, words in POSITION_HEADINGS.items()]
    entries += [("position", value, (word,)) for word, value in POSITION_WORDS.items()]
    for attr, value, words in entries:
        for phrase in words:
            key = tuple(_tokens(phrase))
            if lexicon.setdefault(key, (attr, value)) != (attr, value):
                raise AssertionError(f"synonym {phrase!r} is ambiguous")  # a vocabulary edit broke parsing
    return lexicon


_LEXICON = _build_lexicon()


_LONGEST = max(len(k) for k in _LEXICON)


def parse_caption(text: str) -> list[dict[str, str]]:
    """Recover the objects' attributes from a caption, in the order the caption mentions them.

    Exact for every caption `make_caption` can produce, partial ones included. Other text gives partial
    dicts or [] and never raises: mentions are found by longest match, and a new object starts at "and"
    (every caption joiner has it, no template or synonym does) or when an attribute repeats.
    """
    if not isinstance(text, str):
        return []
    words = _tokens(text)
    objects: list[dict[str, str]] = []
    current: dict[str, str] = {}
    i = 0
    while i < len(words):
        if words[i] == "and":
            if current:
                objects.append(current)
                current = {}
            i += 1
            continue
        for length in range(min(_LONGEST, len(words) - i), 0, -1):
            hit = _LEXICON.get(tuple(words[i : i + length]))
            if hit is not None:
                attr, value = hit
                if attr in current:
                    objects.append(current)
                    current = {}
                current[attr] = value
                i += length
                break
        else:
            i += 1
    if current:
        objects.append(current)
    return objects


def labels_match(a: dict[str, str], b: dict[str, str], attribute: str) -> bool:
    """True when both objects name `attribute` and agree on it (a missing attribute never matches)."""
    return attribute in a and a.get(attribute) == b.get(attribute)


def objects_match(a: Sequence[dict[str, str]], b: Sequence[dict[str, str]]) -> bool:
    """True when two object lists hold the same objects, in any order (captions may reorder them)."""
    return sorted(_object_key(o) for o in a) == sorted(_object_key(o) for o in b)


def _object_key(obj: dict[str, str]) -> tuple[str, ...]:
    return tuple(obj.get(attr, "") for attr in ATTRIBUTES)


def sample_objects(
    rng: random.Random, max_objects: int, pairs: Sequence[tuple[str, str]] = IMAGE_PAIRS
) -> list[dict[str, str]]:
    """1..max_objects objects at distinct positions; (colour, shape) drawn from `pairs`."""
    n_objects = rng.randint(1, max_objects)
    positions = rng.sample(POSITIONS, n_objects)
    objects = []
    for position in positions:
        colour, shape = rng.choice(pairs)
        objects.append({"shape": shape, "colour": colour, "size": rng.choice(SIZES), "position": position})
    return objects


def caption_corpus(seed: int, n_captions: int, max_objects: int = 2, partial: bool = False) -> list[str]:
    """The text-only corpus: its own random stream, every colour-shape pair including HELD_OUT_PAIRS.

    Caption i's first object cycles through all 360 (colour, shape, size, position) combinations, so any
    36 consecutive captions cover every colour-shape pair and 360 cover every single-object combination;
    the second object, synonyms and templates are random. `partial`: each caption then states a random
    non-empty subset of each object's attributes (`partial_objects`), as the partial world's captions do.
    """
    rng = random.Random(f"synth/corpus/{seed}")  # independent of the image stream
    all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
    rng.shuffle(all_pairs)
    size_positions = [(z, p) for z in SIZES for p in POSITIONS]
    rng.shuffle(size_positions)
    n_pairs, n_sp = len(all_pairs), len(size_positions)
    captions = []
    for i in range(n_captions):
        q, r = divmod(i, n_pairs)
        colour, shape = all_pairs[r]
        # (7q + r) mod 10 with gcd(7, 10) = 1 makes i -> (pair, size/position) a bijection on 0..359.
        size, position = size_positions[(7 * q + r) % n_sp]
        first = {"shape": shape, "colour": colour, "size": size, "position": position}
        objects = [first]
        if max_objects == 2 and rng.random() < 0.5:
            colour2, shape2 = rng.choice(all_pairs)
            position2 = rng.choice([p for p in POSITIONS if p != position])
            objects.append({"shape": shape2, "colour": colour2, "size": rng.choice(SIZES),
                            "position": position2})  # fmt: skip
            if rng.random() < 0.5:  # vary which object is mentioned first
                objects.reverse()
        if partial:
            objects = partial_objects(objects, rng)
        captions.append(make_caption(objects, rng))
    return captions
