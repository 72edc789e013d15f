"""The one loop of every shard-mapped step: embed, captions, retrieve's search, optimize (and the
trainers' latents, `trainers vae --encode`).

A step's module plans its shards against their manifests (tasks with `.spec`, each with the reason it
runs, plus the shards already up to date) and makes one shard (`fn(task, progress) -> manifest`, which
commits it). `run_shards` does what is the same for all of them: it removes the temp files a killed run
left, moves stats files to their current place, gives the progress bar its total, maps the tasks
through the executor (this process, or Dask: feature_cache.executor), and sums what the manifests say they
wrote and dropped.

Every step, and every stage of several steps, reports one `StageResult`: what it made, what was already
up to date, what it wrote and set aside, and its step-specific totals (`summary`); a stage of several
steps (retrieve) holds each step's result in `steps`. A shard remade with the same data outputs as the
version it replaced (a touched input) is `shards_identical`: downstream shards key on those digests, so
they stay up to date, and `pipeline run` says so on their line (`upstream_identical`, `describe_shards`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests import clean_temp_files, migrate_stats, read_manifest


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
    shards_identical: list[int] = field(default_factory=list)  # remade, with the data outputs it had before
    # upstream step -> its shards remade identical in this run that left shards of this one up to date
    # (filled by `pipeline run`, which knows what the run remade; pipeline/run.py)
    upstream_identical: dict[str, list[int]] = field(default_factory=dict)
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
    from feature_cache.executor import LocalExecutor

    t0 = time.perf_counter()
    clean_temp_files(Path(cache) / stage)
    migrate_stats(cache, stage)
    if total is not None and hasattr(progress, "set_total"):
        progress.set_total(total())
    before = {t.spec.shard: data_digests(read_manifest(cache, stage, t.spec.shard)) for t in tasks}
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
        shards_identical=sorted(
            m["shard"] for m in manifests if data_digests(m) and before.get(m.get("shard")) == data_digests(m)
        ),
    )


def data_digests(manifest: dict[str, Any] | None) -> dict[str, str]:
    """A manifest's data outputs by path (JSON metadata aside: index.json records its build time)."""
    outs = (manifest or {}).get("outs", [])
    return {o["path"]: o["digest"] for o in outs if not o["path"].endswith(".json")}


def describe_shards(result: StageResult) -> str:
    """`1 shard(s) made (00001 identical to before), 3 up to date (embed shard 00001 remade with identical
    outputs)`: what a stage's summary line says about its shards."""
    made = f"{len(result.shards_run)} shard(s) made"
    if result.shards_identical:
        made += f" ({_shard_names(result.shards_identical)} identical to before)"
    up = f"{len(result.shards_up_to_date)} up to date"
    why = [
        f"{step} {'shard' if len(shards) == 1 else 'shards'} {_shard_names(shards)}" if shards else step
        for step, shards in result.upstream_identical.items()
    ]
    if why:
        up += f" ({', '.join(why)} remade with identical outputs)"
    return f"{made}, {up}"


def _shard_names(shards: list[int], limit: int = 3) -> str:
    names = ", ".join(f"{s:05d}" for s in shards[:limit])
    return names + (f" and {len(shards) - limit:,} more" if len(shards) > limit else "")


def embed_rows(cache: Path, tasks: Sequence) -> int:
    """The embed rows of the tasks' shards: what a bar over a per-image step counts."""
    from manifests import list_manifests

    embed = list_manifests(cache, "embed")
    return sum(embed[t.spec.shard].get("rows", 0) for t in tasks)
