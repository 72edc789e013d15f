"""What a step's status function (pipeline/engine/stage.py) returns, `StageStatus`: per shard, up to date
or stale and why; and the helpers the stages' status functions share. `pipeline status` (pipeline/status.py)
asks every step in DAG order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests import absent_reason, check_outputs, list_manifests


@dataclass
class StageStatus:
    stage: str
    up_to_date: list[int] = field(default_factory=list)
    stale: dict[int, str] = field(default_factory=dict)  # shard -> reason
    note: str = ""  # stage-level remark (not configured, ...)

    def mark(self, shard: int, reason: str) -> None:
        """Stale `shard` for `reason`, keeping a reason it already has of its own."""
        if shard in self.up_to_date:
            self.up_to_date.remove(shard)
        self.stale.setdefault(shard, reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "up_to_date": len(self.up_to_date),
            "stale": {str(k): v for k, v in sorted(self.stale.items())},
            "note": self.note,
        }


def committed_status(cache: Path, stage: str) -> StageStatus:
    """Status from the committed manifests alone: each shard is fine unless its outputs were altered."""
    status = StageStatus(stage)
    for shard, manifest in sorted(list_manifests(cache, stage).items()):
        reason = check_outputs(cache, manifest)
        if reason:
            status.stale[shard] = reason
        else:
            status.up_to_date.append(shard)
    return status


def some_names(names, limit: int = 2) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def mark_committed_upstream(
    cache: Path, status: StageStatus, embed: StageStatus, retrieve: StageStatus
) -> None:
    """An unconfigured optimize stage: stale where embed is, or retrieve is and the shard read it, and where
    an embed shard has no optimize shard yet."""
    manifests = list_manifests(cache, status.stage)
    for shard in sorted(set(embed.up_to_date) | set(embed.stale)):
        deps = manifests.get(shard, {}).get("deps", [])
        if shard in embed.stale:
            status.mark(shard, "upstream changed: embed")
        elif shard in retrieve.stale and any(d["name"].startswith("retrieve/") for d in deps):
            status.mark(shard, "upstream changed: retrieve")
        elif shard not in status.up_to_date:
            status.stale.setdefault(shard, absent_reason(cache, status.stage, shard))
