"""The steps of a cache (feature_cache/steps.py) and the stages that make them (pipeline/stages.py): what
run, status and the trainers' error messages use."""

from __future__ import annotations

from feature_cache import steps as dag
from pipeline import stages
from pipeline.engine.stage import Stage
from pipeline.run import RunConfig
from pipeline.status import other_stages


def test_steps_come_in_dag_order_and_name_their_stage():
    seen: set[str] = set()
    for step in dag.STEPS:
        assert set(step.upstream) <= seen, step.name  # everything a step reads comes before it
        assert step.stage in dag.stage_names()
        seen.add(step.name)
    assert dag.stage_names() == ("embed", "retrieve", "optimize")
    assert RunConfig(until="retrieve").stages() == ("embed", "retrieve")


def test_commands_name_the_stage_that_makes_a_step(tmp_path):
    assert dag.command("index", "c") == "pipeline retrieve --captions CORPUS --cache c"
    assert dag.command("optimize-mix", "c") == "pipeline optimize --variant mix --cache c"
    assert dag.step("optimize-mix").upstream == ("embed", "retrieve")


def test_status_lists_only_stages_outside_the_dag_as_others(tmp_path):
    for name in (*dag.step_names(), "optimize-mix", "latents/abc"):
        (tmp_path / name / "_manifests").mkdir(parents=True)
    assert other_stages(tmp_path) == ["latents/abc", "optimize-mix"]


def test_every_registered_stage_implements_the_protocol_and_owns_its_steps_status():
    assert tuple(s.NAME for s in stages.STAGES) == dag.stage_names()
    for stage in stages.STAGES:
        assert isinstance(stage, Stage), stage.__name__
        assert set(stage.STATUS) == {step.name for step in dag.STEPS if step.stage == stage.NAME}
