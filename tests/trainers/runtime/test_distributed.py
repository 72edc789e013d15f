"""Data-parallel training under torchrun (trainers/runtime/distributed.py), on the CPU with gloo: 2 processes
take the same steps as 1 at the same global batch, resume across world sizes, never share a sample, and a
killed rank ends the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import tiny_cache
from torchrun import ENV, TORCHRUN, assert_close, assert_same_metrics, checkpoint, lrs_of, metrics, trainers

from trainers.data.stream import BatchPositions
from trainers.runtime.checkpoints import list_checkpoints
from trainers.runtime.distributed import World, launched_world


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("ddp-cache"))


def gan_args(cache, out, steps: int, **more) -> list:
    args = ["gan", "--cache", cache, "--out", out, "--size", "tiny", "--steps", steps, "--batch-size", 8]
    args += ["--condition", "perturb", "--device", "cpu", "--checkpoint-every", 2, "--sample-every", 0]
    return args + [x for k, v in more.items() for x in (f"--{k.replace('_', '-')}", v)]


def test_two_gan_processes_take_the_one_process_steps(cache, tmp_path):
    trainers(gan_args(cache, tmp_path / "one", 4, log_every=1))
    trainers(gan_args(cache, tmp_path / "two", 4, log_every=1), nproc=2)
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 4  # R1 ran at step 0: the lazy regulariser is in the comparison
    for part in ("G", "G_ema", "D"):
        assert_close(one[part], two[part], lrs_of(one["config"]))
    assert not torch.equal(one["G"]["mapping.0.weight"], checkpoint_at_start(cache, tmp_path)), "it trained"
    # every step's logged losses are the global batch's, averaged over the ranks; the contrastive ones are
    # of the gathered batch, not scaled for the backward
    assert [line["step"] for line in metrics(tmp_path / "two")] == [1, 2, 3, 4]
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "two"))


def checkpoint_at_start(cache, tmp_path):
    trainers(gan_args(cache, tmp_path / "zero", 1, lr=1e-30))
    return checkpoint(tmp_path / "zero")["G"]["mapping.0.weight"]


@pytest.fixture(scope="module")
def one_process_gan_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("gan-one")
    trainers(gan_args(cache, out, 4))
    return out


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_a_run_resumes_with_another_world_size_on_the_same_stream(
    cache, tmp_path, one_process_gan_run, first, then
):
    out = tmp_path / "run"
    trainers(gan_args(cache, out, 2), nproc=first)
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    trainers(gan_args(cache, out, 4, resume=run), nproc=then)
    resumed = checkpoint(out)
    assert resumed["step"] == 4
    for part in ("G", "G_ema", "D"):
        assert_close(checkpoint(one_process_gan_run)[part], resumed[part], lrs_of(resumed["config"]))
    logged = metrics(out)  # each invocation's last step, logged as one process logs it
    assert [line["step"] for line in logged] == [2, 4]
    assert_same_metrics(metrics(one_process_gan_run), logged[1:])


def test_ranks_split_each_global_batch_and_never_share_a_sample():
    epoch = 24  # samples; global batch 8 -> 3 steps per epoch
    one = [p for _, p in zip(range(3), BatchPositions(8, 0), strict=False)]
    ranks = [[p for _, p in zip(range(3), BatchPositions(8, 0, r, 2), strict=False)] for r in (0, 1)]
    seen = [set(x for batch in positions for x in batch) for positions in ranks]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(epoch))
    for step in range(3):  # rank 0 then rank 1 is exactly the one-process batch
        assert ranks[0][step] + ranks[1][step] == one[step]
    resumed = next(iter(BatchPositions(8, 2, 1, 2)))
    assert resumed == ranks[1][2]  # a resume at step 2 is the same stream, by arithmetic


def test_a_launch_that_cannot_split_the_batch_is_one_line(cache, tmp_path):
    args = [*TORCHRUN, "--nproc_per_node", "2", "-m", "trainers"] + list(
        map(str, gan_args(cache, tmp_path, 2))
    )
    args[args.index("--batch-size") + 1] = "7"
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert "--batch-size 7 is the global batch and must be a multiple of the 2 processes" in proc.stderr


def test_an_incomplete_torchrun_environment_is_refused(monkeypatch):
    from core.errors import ConfigError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="WORLD_SIZE, LOCAL_RANK not set while RANK is"):
        launched_world()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_world() == World(0, 2, 0)


def test_ctrl_c_is_said_once_by_rank_0(monkeypatch, capsys):
    """Ctrl-C reaches every rank of a torchrun job; only rank 0 prints the line (trainers.engine.loop.launch).
    By hand, 2 gloo ranks under torchrun with SIGINT to their process group printed it once."""
    from types import SimpleNamespace

    from trainers.engine import loop

    def interrupted(world, device, progress):
        raise KeyboardInterrupt

    config = SimpleNamespace(validate=lambda: None, device="cpu", batch_size=2)
    monkeypatch.setattr(loop, "close_world", lambda world: None)
    said = []
    for rank in (0, 1):
        monkeypatch.setattr(loop, "init_world", lambda device, rank=rank: (World(rank, 2), "cpu"))
        with pytest.raises(KeyboardInterrupt):
            loop.launch(config, interrupted)
        said.append(capsys.readouterr().err.splitlines())
    assert said == [["interrupted: no checkpoint was written yet"], []]


def test_a_killed_rank_ends_the_job_and_leaves_whole_checkpoints(cache, tmp_path):
    out = tmp_path / "killed"
    env = {**ENV, "PIPELINE_CRASH_AT": "train:rank1:step3"}  # rank 1 dies after step 3 (SIGKILL)
    launch = [*TORCHRUN, "--nproc_per_node", "2", "-m", "trainers", *map(str, gan_args(cache, out, 50))]
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=240)  # a hang times out
    assert proc.returncode != 0
    assert "rank" in proc.stderr and ("Signals.SIGKILL" in proc.stderr or "SIGKILL" in proc.stderr), (
        proc.stderr[-2000:]
    )
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    saved = list_checkpoints(run)
    assert saved and all(torch.load(p, map_location="cpu", weights_only=True)["step"] <= 4 for p in saved)
    assert not [p for p in run.iterdir() if ".tmp" in p.name or p.name.startswith(".")]


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_two_ldm_processes_take_the_one_process_steps(cache, tmp_path, space):
    ldm = ["ldm", "--cache", cache, "--space", space, "--size", "tiny", "--steps", 3, "--batch-size", 8]
    if space == "latent":
        vae = ["vae", "--cache", cache, "--out", tmp_path / "vae", "--size", "tiny", "--steps", 2]
        trainers([*vae, "--batch-size", 4, "--eval-n", 4, "--device", "cpu"])
        (vae_run,) = (tmp_path / "vae").iterdir()
        ldm += ["--vae", vae_run]
    ldm += ["--condition", "perturb", "--device", "cpu", "--log-every", 1]
    trainers([*ldm, "--out", tmp_path / "one"])
    trainers([*ldm, "--out", tmp_path / "two"], nproc=2)
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 3 and one["arch"] == two["arch"]  # one latent scale for all ranks
    assert_close(one["model"], two["model"], lrs_of(one["config"]))
    assert_close(one["ema"], two["ema"], lrs_of(one["config"]))
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "two"))  # the global batch's loss
    assert [line["step"] for line in metrics(tmp_path / "two")] == [1, 2, 3]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state: the parent pid
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_no_rank_outlives_a_sigkilled_torchrun(cache, tmp_path):
    args = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "-m",
        "trainers",
        *map(str, gan_args(cache, tmp_path, 100_000)),
    ]
    agent = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 120
        ranks: list[int] = []
        while time.monotonic() < deadline and len(ranks) < 2:
            time.sleep(0.5)
            ranks = _children(agent.pid)
        assert len(ranks) == 2, "torchrun did not start its two ranks"
        time.sleep(8)  # into training: both ranks have joined the process group
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(r) for r in ranks):
            time.sleep(0.2)
        assert not any(_alive(r) for r in ranks), "a rank outlived its torchrun"
    finally:
        agent.kill()
        for r in _children(agent.pid):
            os.kill(r, signal.SIGKILL)
