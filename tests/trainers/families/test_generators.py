"""The generator-family registry (trainers.families.registry) and the trainers' shared config skeleton."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from core.lazy import member
from trainers.families.registry import FAMILIES
from trainers.runtime.runs import RunConfig


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_every_family_resolves_and_its_config_round_trips(kind):
    family = FAMILIES[kind]
    assert family.kind == kind
    for ref in (family.train, family.load):
        assert callable(member(ref)), ref
    assert member(family.sizes) and "tiny" in member(family.sizes)
    config_cls = member(family.config)
    assert issubclass(config_cls, RunConfig)
    config = config_cls(cache=Path("cache"), out=Path("runs"), size="tiny")
    recorded = config.to_dict()
    assert recorded["cache"] == str(Path("cache").resolve())  # absolute, plain JSON
    assert all(not isinstance(v, Path | tuple) for v in recorded.values())
    back = config_cls.from_dict({**recorded, "a_field_from_newer_code": 1})
    assert back == replace(config, cache=Path(recorded["cache"]), out=Path(recorded["out"]))
