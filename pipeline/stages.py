"""The pipeline's stages in DAG order: what `pipeline run` configures and runs, and whose status functions
`pipeline status` asks. Adding a stage is its folder (a module implementing pipeline/engine/stage.py's
protocol), its steps in feature_cache/steps.py and one line here."""

from __future__ import annotations

from pipeline.embed import stage as embed
from pipeline.engine.stage import Stage, StatusFunction
from pipeline.optimize import stage as optimize
from pipeline.retrieve import stage as retrieve

STAGES: tuple[Stage, ...] = (embed, retrieve, optimize)


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.NAME == name)


def status_function(step: str) -> StatusFunction:
    """The status function of a step, from the stage that makes it."""
    return next(s.STATUS[step] for s in STAGES if step in s.STATUS)
