"""Where shard tasks run: in this process, or on a Dask distributed cluster.

Every stage is a map over shard tasks. A task is a small picklable object with a `spec` (its
`ShardSpec`); its function makes the shard, commits it and returns the manifest dict, never arrays.
Tasks are idempotent (a rerun writes the same bytes), so Dask may retry them freely.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from core.errors import ConfigError
from manifests.errors import DiskFull, with_space_needed

# The one progress protocol: a stage's tasks call `Progress` as they go; a stage that opens its own bars
# (one per step: retrieve) takes a `ProgressFactory`, `core.progress.progress_bar`'s shape.
Progress = Callable[[int, list[str]], None]  # (items just finished, reasons of those dropped)
ProgressFactory = Callable[..., Any]  # (description, total, unit) -> a context manager yielding a Progress
Count = Callable[[dict], tuple[int, list[str]]]  # what a finished shard's manifest adds to a progress bar


def rows_done(manifest: dict) -> tuple[int, list[str]]:
    dropped = manifest.get("dropped", {})
    return manifest.get("rows", 0) + sum(dropped.values()), [r for r, n in dropped.items() for _ in range(n)]


class LocalExecutor:
    """Runs tasks one after another in this process, feeding `fn(task, progress)` the live progress bar."""

    name = "local"

    def map(
        self,
        fn: Callable,
        tasks: Iterable,
        *,
        gpu: bool = False,
        progress: Progress | None = None,
        count: Count = rows_done,
    ) -> list[dict]:
        tasks, results = list(tasks), []
        try:
            for task in tasks:
                results.append(fn(task, progress))
        except DiskFull as e:
            raise space_needed(e, tasks, results) from None
        return results

    def close(self) -> None:
        pass


class DaskExecutor:
    """Submits tasks to a Dask cluster: an existing scheduler, or a LocalCluster started on the spot.

    Task keys include the shard's fingerprint; GPU stages ask for `resources={"GPU": 1}` when the
    cluster's workers advertise GPUs (`dask worker ... --resources GPU=1`), so one task runs per GPU.
    Failed tasks are retried (`retries`); a worker that dies mid-task has its task rescheduled.
    """

    name = "dask"

    def __init__(self, scheduler: str | None = None, workers: int | None = None, retries: int = 2):
        from distributed import Client, LocalCluster

        scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
        self.retries = retries
        self._cluster = None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout="20s")
            except OSError as e:
                raise ConfigError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        else:
            self._cluster = LocalCluster(
                n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=None
            )
            self.client = Client(self._cluster)

    def _gpu_resources(self) -> dict | None:
        workers = self.client.scheduler_info().get("workers", {})
        has_gpus = any(w.get("resources", {}).get("GPU") for w in workers.values())
        return {"GPU": 1} if has_gpus else None

    def map(
        self,
        fn: Callable,
        tasks: Iterable,
        *,
        gpu: bool = False,
        progress: Progress | None = None,
        count: Count = rows_done,
    ) -> list[dict]:
        """Results in completion order; the progress bar advances by `count(manifest)` per finished shard."""
        from distributed import as_completed

        tasks = list(tasks)
        if not tasks:
            return []
        resources = self._gpu_resources() if gpu else None
        futures = []
        for task in tasks:
            spec = task.spec
            key = f"{spec.stage}-{spec.shard:05d}-{spec.key[:16]}"
            futures.append(self.client.submit(fn, task, key=key, retries=self.retries, resources=resources))
        results = []
        try:
            for future in as_completed(futures):
                result = future.result()  # re-raises the task's exception once its retries are spent
                if progress:
                    progress(*count(result))
                results.append(result)
        except DiskFull as e:
            self.client.cancel(futures)
            raise space_needed(e, tasks, results) from None
        return results

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def space_needed(error: DiskFull, tasks: list, done: list[dict]) -> DiskFull:
    """A full disk mid-stage: name the cache and estimate what the unfinished shards need."""
    from manifests import list_manifests

    cache, stage = tasks[0].config.cache, tasks[0].spec.stage
    sizes = [sum(o["size"] for o in m.get("outs", [])) for m in done]
    if not sizes:
        sizes = [sum(o["size"] for o in m.get("outs", [])) for m in list_manifests(cache, stage).values()]
    return with_space_needed(error, cache, sizes, len(tasks) - len(done))


def make_executor(executor: str, scheduler: str | None = None, workers: int | None = None):
    if executor == "local":
        return LocalExecutor()
    if executor == "dask":
        return DaskExecutor(scheduler, workers)
    raise ConfigError("--executor must be local or dask")
