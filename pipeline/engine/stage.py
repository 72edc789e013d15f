"""The stage protocol: what a module must define to be a `pipeline run` stage (pipeline/stages.py lists
them). A stage makes one or more steps of the cache (feature_cache/steps.py) and owns the status function
of each.

`configure` turns the pipeline.toml sections into the stage's configs (() when it is not configured: retrieve
without a caption corpus; several for optimize's variants), `run_stage` plans, runs and commits one config's
shards, and `report` is what `pipeline run` prints of its result. A step's status function is
`(cache, configs, upstream) -> list[StageStatus]`, given its stage's configs and the status of each
upstream step by name (pipeline/engine/step_status.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

StatusFunction = Callable[..., list]


@runtime_checkable
class Stage(Protocol):
    NAME: str  # what --until and --force name, and its pipeline.toml section
    STATUS: Mapping[str, StatusFunction]  # each step it makes -> that step's status function

    def configure(self, sections: dict, cache: Any, *, force: bool, verify: bool, repair: bool) -> tuple: ...

    def run_stage(self, config: Any, executor: Any, progress_factory: Callable) -> Any: ...

    def report(self, result: Any, config: Any) -> list[str]: ...
