"""Shared fixtures (a project that went through `pipeline run`, one torch thread, an image folder); the
factories live in `factories.py` beside this file (on pytest's pythonpath)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
from factories import RUN_CONFIG, image_bytes
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the network from tests
warnings.filterwarnings("ignore", message=".*random weights.*")


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """In-process commands take their threads as on a quiet machine: the load average (this suite's own
    subprocesses, other jobs) would make their count and their `threads:` note vary from run to run. The
    tests of that rule (tests/core/test_processes.py) set the load they need; what /proc/stat shows
    busy now is unknown unless a test sets it, so a load they set decides alone."""
    from core import processes

    monkeypatch.setattr(processes, "load_average", lambda: None)
    monkeypatch.setattr(processes, "busy_cpus", lambda: None)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Six good images in two sub-folders, with a caption beside one of them."""
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        (root / "a" / f"img{i}.jpg").write_bytes(image_bytes((40 * i, 100, 200), size=(48 + i, 40)))
        (root / "b" / f"pic{i}.PNG").write_bytes(image_bytes((200, 40 * i, 50), fmt="PNG"))
    (root / "a" / "img0.txt").write_text("a blue picture\n")
    return root


@pytest.fixture(scope="module")
def built_project(tmp_path_factory):
    """(root, pristine): a project whose cache went through `pipeline run`, and a copy of it.

    48 images of 32 px in 3 tars, 120 captions, lafite-tiny with random weights.
    """
    from cli.pipeline import app
    from world.synth import SynthConfig, run_synth

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on CPU. On this 2-core machine 2 threads are ~1.8x faster when it is idle, but ~10x
    slower when another process is busy (OpenMP synchronisation: 40 CLIP steps took 25 s vs 2.7 s, the
    test probe 53 s vs 4.4 s); one thread keeps the suite inside its time budget either way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
