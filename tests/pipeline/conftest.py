"""Fixtures shared by the pipeline tests: a synthetic project that went through `pipeline run`."""

from __future__ import annotations

import os
import shutil

import pytest
from factories import RUN_CONFIG
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.synth import SynthConfig, run_synth


@pytest.fixture(scope="module")
def built_project(tmp_path_factory):
    """(root, pristine): a project whose cache went through `pipeline run`, and a copy of it.

    48 images of 32 px in 3 tars, 120 captions, lafite-tiny with random weights.
    """
    root = tmp_path_factory.mktemp("built") / "project"
    run_synth(SynthConfig(out=root / "world", n=48, shard_size=16, n_captions=120, image_size=32))
    (root / "pipeline.toml").write_text(RUN_CONFIG)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, ["run"])
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    pristine = root.parent / "pristine"
    shutil.copytree(root, pristine, symlinks=True)
    return root, pristine


@pytest.fixture
def ran_project(built_project, monkeypatch):
    """The built project, restored for this test at the same path (the cache records its inputs by
    absolute path), as the working directory."""
    root, pristine = built_project
    shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)
    monkeypatch.chdir(root)
    return root
