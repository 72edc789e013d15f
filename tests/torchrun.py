"""Running `trainers` commands as one process or under torchrun (gloo, CPU), and comparing checkpoints:
the helpers of the data-parallel tests. Imported by tests as `from torchrun import ...`."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from trainers.checkpoints import list_checkpoints

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def trainers(args: list, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`trainers ARGS` as one plain process, or under torchrun with `nproc` processes; must succeed."""
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
    """The latest checkpoint of the one run in `out`."""
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return torch.load(list_checkpoints(run)[-1], map_location="cpu", weights_only=True)


def assert_close(a: dict, b: dict, atol: float = 1e-4) -> None:
    """Equal to float tolerance: summing gradients over ranks rounds differently, and Adam (which divides
    each step by the gradient's scale) turns that into about 1e-5 in weights of size ~1 after 4 steps."""
    assert a.keys() == b.keys()
    for name in a:
        diff = float((a[name].float() - b[name].float()).abs().max()) if a[name].numel() else 0.0
        assert diff <= atol, f"{name}: differs by {diff:.2e}"
