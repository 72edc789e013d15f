"""The README's multi-node launch, run on one machine: two torchrun launchers, one per "node", meet at a c10d
rendezvous (`--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`), each with its own local rank 0.
The job takes the one-process steps, and only global rank 0 (node 0) writes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from factories import tiny_cache
from torchrun import ENV, assert_close, checkpoint, lrs_of, trainers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gan_args(cache, out) -> list[str]:
    args = ["gan", "--cache", cache, "--out", out, "--size", "tiny", "--steps", 4, "--batch-size", 8]
    return [str(a) for a in args + ["--condition", "perturb", "--device", "cpu", "--sample-every", 0]]


def node(rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """One node's launcher, as the README's multi-node command starts it."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    launch += ["--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    launch += ["--rdzv-id", "multinode-test", "--max-restarts", "0"]
    return subprocess.Popen(
        [*launch, "-m", "trainers", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="two launchers on one host, as CI runs")
def test_two_nodes_meet_at_the_rendezvous_and_take_the_one_process_steps(tmp_path):
    cache = tiny_cache(tmp_path / "cache")
    trainers(gan_args(cache, tmp_path / "one"))
    out, port = tmp_path / "two-nodes", free_port()
    nodes = [node(rank, port, gan_args(cache, out)) for rank in (0, 1)]
    try:
        logs = [n.communicate(timeout=300) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for n, (_, stderr) in zip(nodes, logs, strict=True):
        assert n.returncode == 0, stderr[-3000:]
    one, two = checkpoint(tmp_path / "one"), checkpoint(out)
    assert one["step"] == two["step"] == 4
    for part in ("G", "G_ema", "D"):
        assert_close(one[part], two[part], lrs_of(one["config"]))
    (run,) = [p for p in out.iterdir() if p.is_dir()]  # one run folder: node 1 wrote nothing of its own
    assert (run / "metrics.jsonl").is_file()
    printed = [line for line in logs[1][0].splitlines() if not line.startswith("[Gloo]")]  # torch's own
    assert printed == [], "only global rank 0 prints"
