"""world.attribute_precision: the one definition, on hand-made captions with exact expected numbers,
and the retrieve and optimize stats agreeing on the same captions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from feature_cache.caption_bank import load_caption_bank
from manifests import Dep, write_parquet_atomic
from methods.common import nearest_caption_precision
from pipeline.retrieve.search import score_attributes
from world.attribute_precision import (
    FIGURES,
    attribute_precision,
    matching_object,
    object_hits,
    target_object,
)
from world.grammar import parse_caption

RED_CIRCLE = {"shape": "circle", "colour": "red", "size": "small", "position": "left"}
BLUE_SQUARE = {"shape": "square", "colour": "blue", "size": "large", "position": "top"}

# (caption, its hits against RED_CIRCLE for shape, colour, size, position, object)
CASES = {
    "partial": ("a red circle", (1, 1, 0, 0, 0)),  # size and position unstated: misses
    "second object": ("a big blue box at the top, and a small red disc on the left", (1, 1, 1, 1, 1)),
    # both objects state two of the target's values: the first mentioned is compared
    "tie": ("a small red square at the top and a large blue circle on the left", (0, 1, 1, 0, 0)),
    "unparsable": ("nothing to see here", (0, 0, 0, 0, 0)),
}


def test_target_is_the_first_labelled_object():
    labels = {"objects": [RED_CIRCLE, BLUE_SQUARE]}
    assert target_object(labels) == RED_CIRCLE
    assert target_object(json.dumps(labels)) == RED_CIRCLE
    for bad in (None, "", "not json", "[1, 2]", json.dumps({"objects": []}), json.dumps({"caption": "x"})):
        assert target_object(bad) is None


@pytest.mark.parametrize("case", CASES)
def test_each_hand_made_caption(case):
    text, expected = CASES[case]
    objects = parse_caption(text)
    if case == "unparsable":
        assert objects == []
    if case == "tie":
        assert len(objects) == 2 and matching_object(RED_CIRCLE, objects) is objects[0]
    if case == "second object":
        assert matching_object(RED_CIRCLE, objects) is objects[1]
    score = attribute_precision([(RED_CIRCLE, objects)])
    names = ("shape", "colour", "size", "position", "object")
    assert tuple(score[name] for name in names) == expected
    assert score["mean"] == pytest.approx(sum(expected[:4]) / 4) and score["n"] == 1


def test_the_mean_over_captions_and_what_is_not_scored():
    pairs = [(RED_CIRCLE, parse_caption(text)) for text, _ in CASES.values()]
    pairs += [(None, parse_caption("a red circle")), (RED_CIRCLE, None)]  # unlabelled image, no caption
    score = attribute_precision(pairs)
    assert score == {
        "shape": 0.5,
        "colour": 0.75,
        "size": 0.5,
        "position": 0.25,
        "object": 0.25,
        "mean": 0.5,
        "n": 4,
    }
    assert set(score) == {*FIGURES, "n"}
    assert attribute_precision([]) is None and attribute_precision([(None, [])]) is None


def test_a_partial_target_is_scored_on_what_it_names():
    """The hit rule the probe's eval scoring uses: a prompt naming only a colour scores only the colour."""
    assert object_hits({"colour": "red"}, RED_CIRCLE) == {"colour": True, "object": True}
    assert object_hits({"colour": "red", "shape": "star"}, RED_CIRCLE) == {
        "shape": False,
        "colour": True,
        "object": False,
    }
    assert object_hits(RED_CIRCLE, None) == {
        "shape": False,
        "colour": False,
        "size": False,
        "position": False,
        "object": False,
    }


def test_retrieve_and_optimize_report_the_same_figures(tmp_path):
    """Retrieve scores captions by text, optimize the nearest caption of a feature: same captions, same
    numbers (each caption feature is one-hot, so image i's nearest caption is caption i)."""
    texts = [text for text, _ in CASES.values()] + ["a large blue square at the top", "a small red circle"]
    labels = [json.dumps({"objects": [RED_CIRCLE, BLUE_SQUARE]})] * 4 + [
        json.dumps({"objects": [BLUE_SQUARE]}),
        None,
    ]
    dim = 8
    emb = np.eye(len(texts), dim, dtype=np.float16)
    table = pa.table(
        {
            "caption_id": pa.array(np.arange(len(texts)) * 5 + 3, pa.int64()),
            "text": pa.array(texts, pa.string()),
            "txt_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), dim),
        }
    )
    _, digest = write_parquet_atomic(tmp_path / "captions" / "00000.parquet", table)
    bank = load_caption_bank(tmp_path, (Dep("captions/00000.parquet", digest),), dim)
    truths = [target_object(label) for label in labels]
    optimize = nearest_caption_precision(bank, torch.from_numpy(emb.astype(np.float32)), truths, "cpu")

    retrieve = score_attributes(labels, [[text] for text in texts])
    assert retrieve["n_scored"] == optimize["n"] == 5
    assert retrieve["precision_at_1"] == {name: optimize[name] for name in FIGURES}
    assert optimize["shape"] == pytest.approx(3 / 5) and optimize["object"] == pytest.approx(2 / 5)
