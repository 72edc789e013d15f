"""Running `trainers` commands as one process or under torchrun (gloo, CPU), and comparing checkpoints:
the helpers of the data-parallel tests. Imported by tests as `from torchrun import ...`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from trainers.runtime.checkpoints import list_checkpoints

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


MUTATIONS = Path(__file__).parent / "mutations"  # known bugs a test can put back (its sitecustomize.py)


def trainers(
    args: list, nproc: int = 1, timeout: float = 300, mutation: str | None = None
) -> subprocess.CompletedProcess:
    """`trainers ARGS` as one plain process, or under torchrun with `nproc` processes; must succeed.
    `mutation`: run it with that known bug put back (tests/mutations/sitecustomize.py)."""
    launch = [*TORCHRUN, "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    env = ENV
    if mutation:
        path = os.pathsep.join(p for p in (str(MUTATIONS), ENV.get("PYTHONPATH")) if p)
        env = {**ENV, "PYTHONPATH": path, "LAFITE_TEST_MUTATION": mutation}
    proc = subprocess.run(
        [*launch, "-m", "trainers", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
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
    """The same steps logged with the same values (the global batch's, trainers.engine.loop) to float
    tolerance, images_per_s aside; a value is compared relative to the largest of its column (a loss near 0
    rounds as its column does). Rounding moved them by 2e-7 of that (gan, dalle); rank 0 logging its own half
    batch moves them by 2e-3 (dalle, near its initial loss) to 0.24 (gan), which
    tests/trainers/runtime/test_distributed_dalle_clip.py shows failing."""
    assert [line["step"] for line in one] == [line["step"] for line in two]
    assert [line.keys() for line in one] == [line.keys() for line in two]
    for key in set().union(*one) - {"step", "images_per_s"}:
        a, b = [line.get(key) for line in one], [line.get(key) for line in two]
        scale = max(abs(v) for v in a if v is not None)
        for step, (x, y) in enumerate(zip(a, b, strict=True)):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= rel * max(scale, 1e-3)), (
                f"{key} at line {step}: {x} vs {y}"
            )


# Share of the summed learning rate by which two runs of the same steps may differ (assert_close).
ROUNDING_SHARE = 0.1


def lrs_of(config: dict, steps: int | None = None) -> list[float]:
    """The learning rate of each step a run's `config` (a checkpoint's or config.json's) took, `steps` of
    them (default: its --steps): constant, or the warm-up and cosine of `trainers dalle` and `trainers clip`
    (trainers.engine.loop.lr_at) where the config has a warmup."""
    from types import SimpleNamespace

    from trainers.engine.loop import lr_at

    steps = config["steps"] if steps is None else steps
    if "warmup" not in config:
        return [config["lr"]] * steps
    schedule = SimpleNamespace(lr=config["lr"], warmup=config["warmup"], steps=config["steps"])
    return [lr_at(step, schedule) for step in range(steps)]


def assert_close(a: dict, b: dict, lrs: list[float]) -> None:
    """The weights of two runs of the same steps (at learning rates `lrs`), equal to what rounding allows.

    Adam moves a weight by about lr per step whatever its gradient's scale (exactly lr at step 1 with
    beta1 = 0, the GAN's). A wrong gradient (a draw or dropout mask made per rank, gradients not
    averaged) therefore moves many weights by about lr per step: 2.5e-2 after 4 GAN steps at lr 2.5e-3.
    Rounding (gradients summed over ranks in another order, another CPU's kernels) changes a gradient
    by a tiny share, except one that nearly cancels, which Adam's division by the gradient's own scale
    can turn into a visible share of a step; the GAN's two players carry it on. Seen: 1e-8 (dalle, ldm)
    to 3e-5 (gan, clip) here, 1.2e-4 (gan) on another CPU. So two runs must agree to a tenth of the
    summed learning rate (1e-3 for 4 GAN steps): 8x above the worst rounding seen, 25x below a wrong
    gradient (tests/trainers/runtime/test_distributed_dalle_clip.py shows the dropout-mask case failing)."""
    atol = ROUNDING_SHARE * sum(lrs)
    assert atol > 0 and a.keys() == b.keys()
    for name in a:
        diff = float((a[name].float() - b[name].float()).abs().max()) if a[name].numel() else 0.0
        assert diff <= atol, f"{name}: differs by {diff:.2e} (tolerance {atol:.1e}, {ROUNDING_SHARE} x lrs)"
