"""Running `trainers` commands as one process or under torchrun (gloo, CPU), and comparing checkpoints:
the helpers of the data-parallel tests. Imported by tests as `from torchrun import ...`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from trainers.checkpoints import list_checkpoints

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def trainers(args: list, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`trainers ARGS` as one plain process, or under torchrun with `nproc` processes; must succeed."""
    launch = [*TORCHRUN, "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    proc = subprocess.run(
        [*launch, "-m", "trainers", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def checkpoint(out) -> dict:
    """The latest checkpoint of the one run in `out`."""
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return torch.load(list_checkpoints(run)[-1], map_location="cpu", weights_only=True)


def metrics(out) -> list[dict]:
    """The metrics.jsonl lines of the one run in `out`."""
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(one: list[dict], two: list[dict], rel: float = 1e-4) -> None:
    """The same steps logged with the same values (the global batch's, trainers.loop) to float tolerance,
    images_per_s aside; a value is compared relative to the largest of its column (a loss near 0 rounds as
    its column does)."""
    assert [line["step"] for line in one] == [line["step"] for line in two]
    assert [line.keys() for line in one] == [line.keys() for line in two]
    for key in set().union(*one) - {"step", "images_per_s"}:
        a, b = [line.get(key) for line in one], [line.get(key) for line in two]
        scale = max(abs(v) for v in a if v is not None)
        for step, (x, y) in enumerate(zip(a, b, strict=True)):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= rel * max(scale, 1e-3)), (
                f"{key} at line {step}: {x} vs {y}"
            )


def assert_close(a: dict, b: dict, atol: float = 1e-4) -> None:
    """Equal to float tolerance: summing gradients over ranks rounds differently, and Adam (which divides
    each step by the gradient's scale) turns that into about 1e-5 in weights of size ~1 after 4 steps."""
    assert a.keys() == b.keys()
    for name in a:
        diff = float((a[name].float() - b[name].float()).abs().max()) if a[name].numel() else 0.0
        assert diff <= atol, f"{name}: differs by {diff:.2e}"
