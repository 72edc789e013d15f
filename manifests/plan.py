"""The append-only shard plan: which raw input units make up each embed shard.

Shard `i` of every stage derives from shard `i` of embed, so the plan never reorders: units already
planned keep their shard forever, new units go into new shards, and a removed unit only stales its own
shard (which is remade without it). Never shard by `files[rank::world_size]`: one new file would move
every file to another shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from manifests.atomic import write_json_atomic
from manifests.errors import Unreadable, read_json

PLAN_VERSION = 1


@dataclass
class ShardPlan:
    shards: list[list[str]] = field(default_factory=list)  # unit ids of each shard, in reading order

    @classmethod
    def load(cls, path: Path, fix: str = "restore it from a backup") -> ShardPlan:
        """The plan at `path` (empty when absent); a damaged file raises `Unreadable` naming `fix`."""
        try:
            data = read_json(path, fix)
        except FileNotFoundError:
            return cls()
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise Unreadable(f"{path}: not a shard plan of version {PLAN_VERSION}; {fix}")
        shards = data.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, list) for s in shards):
            raise Unreadable(f"{path}: its shard list is damaged; {fix}")
        return cls(shards=[[str(u) for u in s] for s in shards])

    @classmethod
    def from_manifests(cls, manifests: dict[int, dict]) -> ShardPlan:
        """Rebuild a lost plan: shard i's units are the deps its manifest recorded, in reading order.

        A shard without a readable manifest comes back empty, so its units are planned anew (into new
        shards) and no committed shard changes index.
        """
        shards: list[list[str]] = [[] for _ in range(max(manifests, default=-1) + 1)]
        for shard, manifest in manifests.items():
            shards[shard] = [d["name"] for d in manifest.get("deps", [])]
        return cls(shards=shards)

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
