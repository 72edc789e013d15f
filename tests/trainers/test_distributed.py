"""Data-parallel training under torchrun (trainers/distributed.py), on the CPU with gloo: 2 processes take
the same steps as 1 at the same global batch, resume across world sizes, never share a sample, and a
killed rank ends the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from factories import tiny_cache

from trainers.checkpoints import list_checkpoints
from trainers.data import BatchPositions
from trainers.distributed import World, launched_world

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("ddp-cache"))


def trainers(args: list, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`trainers ARGS` as one plain process, or under torchrun with `nproc` processes."""
    launch = (
        [*TORCHRUN, "--nproc_per_node", str(nproc), "-m", "trainers"]
        if nproc > 1
        else [sys.executable, "-m", "trainers"]
    )
    proc = subprocess.run(
        [*launch, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def checkpoint(out) -> dict:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return torch.load(list_checkpoints(run)[-1], map_location="cpu", weights_only=True)


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=1e-4), name


def gan_args(cache, out, steps: int, **more) -> list:
    args = ["gan", "--cache", cache, "--out", out, "--size", "tiny", "--steps", steps, "--batch-size", 8]
    args += ["--condition", "perturb", "--device", "cpu", "--checkpoint-every", 2, "--sample-every", 0]
    return args + [x for k, v in more.items() for x in (f"--{k.replace('_', '-')}", v)]


def test_two_gan_processes_take_the_one_process_steps(cache, tmp_path):
    trainers(gan_args(cache, tmp_path / "one", 4))
    trainers(gan_args(cache, tmp_path / "two", 4), nproc=2)
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 4  # R1 ran at step 0: the lazy regulariser is in the comparison
    for part in ("G", "G_ema", "D"):
        assert_close(one[part], two[part])
    assert not torch.equal(one["G"]["mapping.0.weight"], checkpoint_at_start(cache, tmp_path)), "it trained"


def checkpoint_at_start(cache, tmp_path):
    trainers(gan_args(cache, tmp_path / "zero", 1, lr=1e-30))
    return checkpoint(tmp_path / "zero")["G"]["mapping.0.weight"]
