"""Shared fixtures; the factories live in `factories.py` beside this file (on pytest's pythonpath)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from factories import image_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the network from tests
warnings.filterwarnings("ignore", message=".*random weights.*")


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """In-process commands take their threads as on a quiet machine: the load average (this suite's own
    subprocesses, other jobs) would make their count and their `threads:` note vary from run to run. The
    tests of that rule (tests/pipeline/test_processes.py) set the load they need; what /proc/stat shows
    busy now is unknown unless a test sets it, so a load they set decides alone."""
    from pipeline import processes

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
