"""Crash safety: a stage SIGKILLed at any instant leaves a valid cache, and a rerun completes it.

Each run is a real subprocess; `PIPELINE_CRASH_AT` (manifests/faults.py) kills it with SIGKILL at a
named commit point, and a timed kill lands somewhere mid-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from factories import TINY_CLIP

from world.synth import SynthConfig, run_synth

CLI = [sys.executable, "-c", "from cli.pipeline import main; main()"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    run_synth(SynthConfig(out=out, n=60, shard_size=20, n_captions=100, image_size=32))
    return out


def _embed_args(world, cache):
    return [
        "embed",
        f"{world}/*.tar",
        "--cache",
        str(cache),
        "--clip-model",
        TINY_CLIP,
        "--clip-pretrained",
        "",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "8",
    ]


def _run(args, crash_at=None, check=True):
    env = dict(os.environ)
    env.pop("PIPELINE_CRASH_AT", None)
    if crash_at:
        env["PIPELINE_CRASH_AT"] = crash_at
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _snapshot(cache):
    """Every committed data file, by name (temp files and manifests' timings aside)."""
    return {
        p.relative_to(cache).as_posix(): p.read_bytes()
        for p in sorted(cache.rglob("*"))
        if p.is_file() and p.suffix in (".tar", ".parquet") and ".tmp-" not in p.name
    }


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    cache = tmp_path_factory.mktemp("reference")
    _run(_embed_args(world, cache))
    return _snapshot(cache)


@pytest.mark.parametrize(
    "point",
    ["embed:00001:before_manifest", "write:00001.parquet:before_replace", "write:00000.tar:before_replace"],
)
def test_sigkill_at_a_commit_point_then_rerun(world, tmp_path, reference, point):
    cache = tmp_path / "cache"
    killed = _run(_embed_args(world, cache), crash_at=point, check=False)
    assert killed.returncode == -signal.SIGKILL
    rerun = _run(_embed_args(world, cache))
    assert "up to date" in rerun.stdout
    assert _snapshot(cache) == reference
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]  # leftovers cleaned


def test_sigkill_at_a_random_instant_then_rerun(world, tmp_path, reference):
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [*CLI, *_embed_args(world, cache)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not (cache / "embed" / "_manifests").is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)  # kill once the first shard is committed: mid-run, not before it starts
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run(_embed_args(world, cache))
    assert _snapshot(cache) == reference
