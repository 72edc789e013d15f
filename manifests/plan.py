"""The append-only shard plan: which raw input units make up each embed shard.

Shard `i` of every stage derives from shard `i` of embed, so the plan never reorders: units already
planned keep their shard forever, new units go into new shards, and a removed unit only stales its own
shard (which is remade without it). Never shard by `files[rank::world_size]`: one new file would move
every file to another shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from manifests.atomic import write_json_atomic

PLAN_VERSION = 1


@dataclass
class ShardPlan:
    shards: list[list[str]] = field(default_factory=list)  # unit ids of each shard, in reading order

    @classmethod
    def load(cls, path: Path) -> ShardPlan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return cls()
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"{path}: unsupported shard plan version {data.get('version')}")
        return cls(shards=[list(s) for s in data["shards"]])

    def save(self, path: Path) -> None:
        write_json_atomic(path, {"version": PLAN_VERSION, "shards": self.shards})

    def planned(self) -> set[str]:
        return {unit for shard in self.shards for unit in shard}

    def append(self, groups: list[list[str]]) -> list[int]:
        """Add new shards; returns their indices. Units already planned are ignored."""
        known = self.planned()
        added = []
        for group in groups:
            fresh = [u for u in group if u not in known]
            if fresh:
                known.update(fresh)
                self.shards.append(fresh)
                added.append(len(self.shards) - 1)
        return added


def group_units(units: list[str], size: int) -> list[list[str]]:
    """Consecutive groups of at most `size` units."""
    return [units[i : i + size] for i in range(0, len(units), size)]
