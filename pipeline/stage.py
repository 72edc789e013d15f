"""The one loop of every shard-mapped step: embed, captions, retrieve's search, optimize (and the
trainers' latents, `trainers vae --encode`).

A step's module plans its shards against their manifests (tasks with `.spec`, each with the reason it
runs, plus the shards already up to date) and makes one shard (`fn(task, progress) -> manifest`, which
commits it). `run_shards` does what is the same for all of them: it removes the temp files a killed run
left, moves stats files to their current place, gives the progress bar its total, maps the tasks
through the executor (this process, or Dask: pipeline.executor), and sums what the manifests say they
wrote and dropped.

Every step, and every stage of several steps, reports one `StageResult`: what it made, what was already
up to date, what it wrote and set aside, and its step-specific totals (`summary`); a stage of several
steps (retrieve) holds each step's result in `steps`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests import clean_temp_files, migrate_stats


@dataclass
class StageResult:
    """What a step (or a stage of several steps) reports after a run."""

    shards_total: int
    shards_run: list[int]
    shards_up_to_date: list[int]
    rows_written: int  # the rows the made shards wrote: images, captions, vectors, features
    dropped: dict[str, int]  # reason -> rows set aside
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)  # step-specific totals
    steps: dict[str, StageResult] = field(default_factory=dict)  # a stage of several steps: each one's
    warnings: list[str] = field(default_factory=list)  # what the command warns about after the run
    manifests: list[dict[str, Any]] = field(default_factory=list, repr=False)  # of the shards made


def run_shards(
    cache: Path,
    stage: str,
    tasks: Sequence,
    fn: Callable,
    *,
    up_to_date: Sequence[int] = (),
    executor=None,
    progress=None,
    total: Callable[[], int] | None = None,
    gpu: bool = True,
) -> StageResult:
    """Make every planned shard of `stage` with `fn` (see the module docstring); `up_to_date`: the shards
    the plan found current. `total()`: the items the progress bar counts (rows, samples), asked only of a
    bar with `set_total`; `gpu`: the tasks want an accelerator."""
    from pipeline.executor import LocalExecutor

    t0 = time.perf_counter()
    clean_temp_files(Path(cache) / stage)
    migrate_stats(cache, stage)
    if total is not None and hasattr(progress, "set_total"):
        progress.set_total(total())
    manifests = (executor or LocalExecutor()).map(fn, tasks, gpu=gpu, progress=progress) if tasks else []
    dropped: Counter = Counter()
    for manifest in manifests:
        dropped.update(manifest.get("dropped", {}))
    return StageResult(
        shards_total=len(tasks) + len(up_to_date),
        shards_run=[t.spec.shard for t in tasks],
        shards_up_to_date=list(up_to_date),
        rows_written=sum(int(m.get("rows", 0)) for m in manifests),
        dropped=dict(dropped),
        seconds=time.perf_counter() - t0,
        manifests=list(manifests),
    )


def embed_rows(cache: Path, tasks: Sequence) -> int:
    """The embed rows of the tasks' shards: what a bar over a per-image step counts."""
    from manifests import list_manifests

    embed = list_manifests(cache, "embed")
    return sum(embed[t.spec.shard].get("rows", 0) for t in tasks)
