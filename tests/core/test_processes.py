"""The process policy: what a command starts dies with it, and torch's threads fit the CPUs it may use.

The kill tests run real commands as subprocesses, stall their workers (`PIPELINE_STALL_AT`,
manifests/faults.py) so they are busy when the parent gets SIGKILL, and read children from /proc.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import TINY_CLIP, tiny_cache
from typer.testing import CliRunner

from core import processes
from world.synth import SynthConfig, run_synth

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; PR_SET_PDEATHSIG is Linux's")

PIPELINE = [sys.executable, "-c", "from cli.pipeline import main; main()"]
TRAINERS = [sys.executable, "-c", "from cli.trainers import main; main()"]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:  # the task exited meanwhile
                continue
            found += kids
            todo += kids
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie (PID 1 of a container may never reap the orphans it adopts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stalled(log: Path) -> set[str]:
    """The processes that reached the stall point, from their `stalled at NAME in PID` lines."""
    return set(re.findall(r"stalled at \S+ in (\d+)", log.read_text()))


def _killed_leaves_nothing(cmd: list[str], n_workers: int, cwd: Path, stall: str) -> None:
    """Start `cmd`, wait until `n_workers` of its workers are stalled at `stall`, SIGKILL it, and assert
    every process it started is gone within 10 s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_STALL_AT": stall, "PIPELINE_STALL_S": "120"}
    log = cwd / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(_stalled(log)) < n_workers:
            assert proc.poll() is None, f"exited {proc.returncode} before its workers: {log.read_text()}"
            assert time.monotonic() < deadline, f"no {n_workers} workers: {log.read_text()}"
            time.sleep(0.1)
        children = [k for k in _descendants(proc.pid) if _alive(k)]
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(k) for k in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [k for k in children if _alive(k)]
    for kid in left:  # don't leave them to the next test
        os.kill(kid, signal.SIGKILL)
    assert _stalled(log) <= {str(k) for k in children}
    assert not left, f"{len(left)} of {len(children)} children still running 10 s after SIGKILL"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    run_synth(SynthConfig(out=out, n=16, shard_size=8, n_captions=40, image_size=32))
    return out


def test_a_killed_embed_leaves_no_decode_worker(world, tmp_path):
    embed = ["embed", f"{world}/*.tar", "--cache", str(tmp_path / "c"), "--clip-model", TINY_CLIP]
    embed += ["--clip-pretrained", "", "--image-size", "32", "--workers", "2", "--batch-size", "4"]
    _killed_leaves_nothing([*PIPELINE, *embed], 2, tmp_path, "embed:decode")


def test_a_killed_dask_run_leaves_no_cluster_worker(world, tmp_path):
    """distributed's own guard (a pipe from the parent that each worker watches) already does this."""
    (tmp_path / "pipeline.toml").write_text(
        f'[embed]\ninputs = ["{world}/*.tar"]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = ""\n'
        'image_size = 32\nworkers = 2\nbatch_size = 4\n[optimize]\nmethod = "perturb"\n'
    )
    run = ["run", "--cache", str(tmp_path / "c"), "--until", "embed", "--executor", "dask", "--workers", "2"]
    _killed_leaves_nothing([*PIPELINE, *run], 2, tmp_path, "embed:decode")


def test_a_killed_trainer_leaves_no_loader_worker(tmp_path):
    cache = tiny_cache(tmp_path)
    gan = ["gan", "--cache", str(cache), "--out", str(tmp_path / "runs"), "--size", "tiny"]
    gan += ["--condition", "perturb", "--steps", "1000", "--batch-size", "4", "--workers", "2"]
    _killed_leaves_nothing([*TRAINERS, *gan, "--device", "cpu"], 2, tmp_path, "trainers:load")


def test_a_worker_whose_parent_died_before_it_could_ask_exits_at_once():
    """PR_SET_PDEATHSIG only covers a parent that dies later: an orphan already has another parent."""
    code = "from core.processes import die_with_parent; die_with_parent(1); print('still here')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and not proc.stdout, proc.stderr


def _cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self_cgroup").write_text(proc_line)
    return root, tmp_path / "self_cgroup"


@pytest.mark.parametrize(
    ("proc_line", "files", "cpus"),
    [
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # v2, no quota
        ("0::/job\n", {"job/cpu.max": "150000 100000\n"}, 1.5),  # v2, 1.5 CPUs
        ("0::/a/b\n", {"a/cpu.max": "300000 100000\n", "a/b/cpu.max": "max 100000\n"}, 3.0),  # a parent's
        ("0::/docker/abc\n", {"cpu.max": "200000 100000\n"}, 2.0),  # host path, namespaced mount
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
        (
            "4:cpu,cpuacct:/x\n",
            {"cpu,cpuacct/x/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"},
            0.5,
        ),
    ],
)
def test_the_cgroup_cpu_quota_is_read_on_v1_and_v2(tmp_path, proc_line, files, cpus):
    root, self_cgroup = _cgroup(tmp_path, proc_line, files)
    assert processes.cgroup_cpu_limit(root, self_cgroup) == cpus


def test_available_cpus_is_the_affinity_capped_by_the_quota_rounded_down(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(processes, "cgroup_cpu_limit", lambda *a: None)
    assert processes.available_cpus() == 4
    monkeypatch.setattr(processes, "cgroup_cpu_limit", lambda *a: 2.5)
    assert processes.available_cpus() == 2
    monkeypatch.setattr(processes, "cgroup_cpu_limit", lambda *a: 0.5)
    assert processes.available_cpus() == 1


@pytest.fixture
def torch_threads(monkeypatch):
    """Torch's thread count and the process's thread request are restored afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(processes, "_requested", processes._UNSET)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("cpus", "workers", "threads"), [(2, 0, 2), (2, 2, 1), (16, 3, 4), (16, 8, 1)])
def test_starting_workers_leaves_the_main_process_a_fair_share(
    torch_threads, monkeypatch, cpus, workers, threads
):
    monkeypatch.setattr(processes, "available_cpus", lambda: cpus)
    torch.set_num_threads(cpus)
    assert processes.limit_threads(workers) == threads == torch.get_num_threads()


def test_starting_workers_never_overrides_an_explicit_count(torch_threads, monkeypatch):
    monkeypatch.setattr(processes, "available_cpus", lambda: 2)
    processes.start_threads(3)
    assert processes.limit_threads(2) == 3 == torch.get_num_threads()


def test_starting_workers_never_raises_a_lower_count(torch_threads, monkeypatch):
    monkeypatch.setattr(processes, "available_cpus", lambda: 16)
    torch.set_num_threads(1)  # as the trainer tests do
    assert processes.limit_threads(0) == 1


def test_a_command_starts_with_the_cpus_it_may_use_or_omp_num_threads(torch_threads, monkeypatch):
    monkeypatch.setattr(processes, "available_cpus", lambda: 3)  # a quota below torch's default of 8
    torch.set_num_threads(8)
    assert processes.start_threads(None) == 3 == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert processes.start_threads(None) == 1 == torch.get_num_threads()
    assert processes.start_threads(2) == 2 == torch.get_num_threads()  # --threads beats the environment
    assert os.environ["OMP_NUM_THREADS"] == "2"  # for the processes it starts


def test_the_embed_loader_lowers_the_main_process_threads_for_its_decoders(torch_threads, monkeypatch):
    from pipeline.embed.data import ShardSamples, shard_loader

    monkeypatch.setattr(processes, "available_cpus", lambda: 2)
    torch.set_num_threads(2)
    dataset = ShardSamples([], image_size=32, image_format="jpg", quality=90, max_pixels=10**8, clip_size=32)
    shard_loader(dataset, batch_size=4, workers=2, pin_memory=False)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("cli", ["pipeline", "trainers"])
def test_the_threads_option_sets_torch_threads_for_the_command(torch_threads, cli):
    from cli.pipeline import app as pipeline_app
    from cli.trainers import app as trainers_app

    app, command = (pipeline_app, "status") if cli == "pipeline" else (trainers_app, "sample")
    result = CliRunner().invoke(app, ["--threads", "3", command, "--help"])  # the root callback runs first
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_threads_below_one_is_refused(torch_threads):
    from cli.pipeline import app

    result = CliRunner().invoke(app, ["--threads", "0", "status"])
    assert result.exit_code == 2 and "--threads" in result.output


def test_idle_openmp_threads_spin_briefly_unless_the_user_chose(torch_threads, monkeypatch):
    for name in processes.OMP_WAIT_ENV:
        monkeypatch.delenv(name, raising=False)
    processes.start_threads(None)
    assert os.environ["GOMP_SPINCOUNT"] == processes.SPIN_COUNT  # inherited by the workers it starts
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    processes.start_threads(None)
    assert "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize(
    ("cpus", "machine", "load", "threads"),
    [(2, 2, 0.3, 2), (2, 2, 1.0, 1), (2, 2, 7.8, 1), (16, 16, 4.2, 12), (4, 64, 32.0, 2), (1, 2, 9.0, 1)],
)
def test_the_default_threads_leave_the_cpus_other_jobs_keep_busy(monkeypatch, cpus, machine, load, threads):
    """The load average counts every CPU of the machine: a process given 4 of 64 by a quota counts its
    share of the load (32 * 4 / 64 = 2 busy)."""
    monkeypatch.setattr(processes, "available_cpus", lambda: cpus)
    monkeypatch.setattr(os, "cpu_count", lambda: machine)
    monkeypatch.setattr(processes, "load_average", lambda: load)
    monkeypatch.setattr(processes, "busy_cpus", lambda: min(load, machine))  # the jobs are busy now too
    monkeypatch.setattr(processes, "_own_load", lambda: 0.0)
    chosen, why = processes.default_threads()
    assert chosen == threads
    assert ("load average" in why) == (threads < cpus), why


@pytest.mark.parametrize(("busy_now", "threads"), [(0.1, 2), (1.0, 1), (None, 1)])
def test_a_load_average_left_by_a_job_that_ended_does_not_lower_the_threads(monkeypatch, busy_now, threads):
    """The 1-minute load average still counts a job that just ended; what /proc/stat shows busy now
    decides (where it cannot be read, the load alone)."""
    monkeypatch.setattr(processes, "available_cpus", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(processes, "load_average", lambda: 1.9)
    monkeypatch.setattr(processes, "busy_cpus", lambda: busy_now)
    monkeypatch.setattr(processes, "_own_load", lambda: 0.0)
    assert processes.default_threads()[0] == threads


REAL_BUSY_CPUS = processes.busy_cpus  # as imported: tests/conftest.py replaces it in every test


def test_busy_cpus_reads_the_machine_now():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat here")
    busy = REAL_BUSY_CPUS(0.05)
    assert busy is not None and 0.0 <= busy <= os.cpu_count()


def test_a_process_does_not_count_its_own_load_as_other_jobs(monkeypatch):
    """A test session runs many commands in one busy process: its own share is not another job."""
    monkeypatch.setattr(processes, "available_cpus", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(processes, "load_average", lambda: 1.0)
    monkeypatch.setattr(processes, "_own_load", lambda: 0.95)
    assert processes.default_threads()[0] == 2
    assert 0.0 <= processes._own_load() <= 2.0  # the real one reads /proc: CPU seconds over age >= 60 s


def test_a_busy_machine_lowers_a_commands_threads_and_its_first_bar_says_why(torch_threads, monkeypatch):
    from core import progress

    monkeypatch.setattr(processes, "available_cpus", lambda: 2)
    monkeypatch.setattr(processes, "_affinity_cpus", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(processes, "load_average", lambda: 1.9)
    monkeypatch.setattr(processes, "busy_cpus", lambda: 1.9)
    monkeypatch.setattr(processes, "_own_load", lambda: 0.0)
    said = []
    monkeypatch.setattr(progress, "print_line", said.append)
    torch.set_num_threads(2)
    assert processes.start_threads(None) == 1 == torch.get_num_threads()
    assert os.environ["OMP_NUM_THREADS"] == "1"  # the processes it starts inherit it
    with progress.progress_bar("embed", total=2):
        pass
    with progress.progress_bar("optimize", total=2):
        pass
    assert said == [
        "threads: 1 torch thread(s) (2 CPUs, and a load average of 1.9 says other jobs keep 1 busy; "
        "--threads N chooses)"
    ]  # once, at the first bar
    said.clear()
    assert processes.start_threads(2) == 2  # asked for: kept, and nothing to say
    with progress.progress_bar("embed", total=2):
        pass
    assert said == []
