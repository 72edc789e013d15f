"""How a command's processes share the machine: the workers it starts die with it, and torch's threads
fit the CPUs it may use.

Workers: a DataLoader worker asks the kernel for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`), so a
killed `pipeline embed` or trainer leaves no decoder holding memory. Torch's own parent check runs only
between batches, every 5 s, and a worker that passes it then hangs in exit joining its queue's feeder
thread, blocked writing to a full pipe whose read end its siblings inherited: 2 of 2 decoders of an embed
of 64-image batches were still running 15 s after its SIGKILL (tests/core/test_processes.py). Dask
LocalCluster workers need nothing here: distributed hands each one a pipe from the parent and the worker
exits when it closes.

Threads: a command starts with `--threads`, else OMP_NUM_THREADS, else `available_cpus()` (the affinity
mask capped by a cgroup CPU quota) less the CPUs other jobs keep busy by the load average, where a short
look at /proc/stat finds them busy now (`default_threads`: a demo started right after another job once
got 1 thread of 2 from the minute-long memory of the load average), and a process that starts W workers
beside it lowers itself to `available_cpus() // (1 + W)`, at least 1; decode and loader workers run 1
thread (torch sets it), Dask workers 1 (distributed sets OMP_NUM_THREADS=1). More threads than free
cores is far worse than fewer: on 2 cores beside one busy process, a GAN-sized step ran at 38-74 img/s
on 2 threads and 480-1000 on 1 (benchmarks/bench_threads.py). The load average sees other jobs only as
they were over the last minute, and the look at /proc/stat only as they are for 0.2 s; a shorter OpenMP
spin (`start_threads`) softens what they miss 2-5x, and on a shared machine --threads 1 avoids it. When
the load lowers the count, the first progress bar says so (`threads_note`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
CGROUP_ROOT = Path("/sys/fs/cgroup")
THREADS_ENV = "OMP_NUM_THREADS"
OMP_WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # how idle OpenMP threads wait, read as torch loads
SPIN_COUNT = "10000"  # libgomp's default spins ~300,000 times (active) before an idle thread sleeps

_UNSET = object()
_requested: int | None | object = _UNSET  # the command's explicit count, once `start_threads` has run
_why = ""  # why the command has the threads it has (`start_threads`)
_note = False  # the load lowered them, and `threads_note` has not said so yet


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent exits; `parent` is the pid it should have.

    The signal fires when the parent *thread* that started this process exits, so start workers from a
    thread that lives as long as they should (the main thread here). A no-op off Linux.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # a sandbox that refuses prctl: torch's own parent check between batches remains
    if os.getppid() != parent:  # the parent died before the prctl: no signal will come now
        os.kill(os.getpid(), signal.SIGKILL)


def _init_worker(parent: int, worker_id: int) -> None:
    die_with_parent(parent)


def loader_worker_init() -> Callable[[int], None]:
    """The `worker_init_fn` of every DataLoader here: each worker dies with this process."""
    return functools.partial(_init_worker, os.getpid())


def _cgroup_quota(directory: Path, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (directory / "cpu.max").read_text().split()
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1"):
        return None
    return int(quota) / int(period)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs allowed by the tightest CPU quota on this process's cgroup and its ancestors (v2 `cpu.max`,
    v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), or None when there is none."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, v2 = root, True
        elif "cpu" in controllers.split(","):
            base, v2 = (root / controllers if (root / controllers).is_dir() else root / "cpu"), False
        else:
            continue
        # Walk up to the mount: a container's mount shows its own cgroup while the path names the host's.
        directory = base.joinpath(*Path(path).parts[1:])
        while True:
            limits.append(_cgroup_quota(directory, v2))
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _affinity_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota rounded down (1.5 CPUs of
    quota run 1 thread unthrottled rather than 2 throttled), at least 1."""
    cpus = _affinity_cpus()
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, int(quota))) if quota is not None else cpus


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, all CPUs together), or None where there is none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_cpus(interval: float = 0.2) -> float | None:
    """CPUs of the machine busy over the next `interval` seconds, from /proc/stat (None where there is
    none). Unlike the load average it does not remember a job that ended within the last minute."""

    def ticks() -> tuple[int, int]:  # (all, idle + iowait) of the "cpu" line, in clock ticks
        user, nice, system, idle, iowait, irq, softirq, steal = map(
            int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        )
        return user + nice + system + idle + iowait + irq + softirq + steal, idle + iowait

    try:
        total0, idle0 = ticks()
        time.sleep(interval)
        total1, idle1 = ticks()
    except (OSError, ValueError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def _own_load() -> float:
    """This process's own share of the 1-minute load average, roughly: its CPU seconds over its age, at
    least a minute (a test session that runs many commands in one process is busy itself)."""
    try:
        age = time.time() - _start_time()
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    return sum(os.times()[:2]) / max(60.0, age)


def _start_time() -> float:
    """When this process started (epoch seconds), from /proc (OSError elsewhere)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    stat = Path("/proc/stat").read_text().splitlines()
    boot = next(float(line.split()[1]) for line in stat if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def default_threads() -> tuple[int, str]:
    """(threads, why) for a command not asked for a count: the CPUs this process may use, less the CPUs
    that other jobs keep busy by the load average (scaled to this process's CPUs where a quota or affinity
    gives it part of the machine, less this process's own share) where a 0.2 s look at /proc/stat agrees
    they are busy now, at least 1."""
    cpus = available_cpus()
    load = load_average()
    if load is None or cpus == 1:
        return cpus, "the CPUs this process may use"
    machine = os.cpu_count() or cpus
    others = max(0.0, load * cpus / machine - _own_load())
    if round(others) > 0:  # the load remembers the last minute: a job just ended still counts, so look now
        busy = busy_cpus()
        if busy is not None:
            others = min(others, busy * cpus / machine)
    threads = max(1, cpus - round(others))
    if threads == cpus:
        return cpus, "the CPUs this process may use"
    return threads, (
        f"{cpus} CPUs, and a load average of {load:.1f} says other jobs keep {cpus - threads} busy; "
        "--threads N chooses"
    )


def _env_threads() -> int | None:
    value = os.environ.get(THREADS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _explicit_threads() -> int | None:
    return _env_threads() if _requested is _UNSET else _requested


def _set_torch_threads(threads: int, exact: bool) -> int:
    """Set torch's intra-op threads if torch is loaded; a chosen (not asked-for) count only ever lowers."""
    torch = sys.modules.get("torch")
    if torch is None:
        return threads
    if not exact:
        threads = min(threads, torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


def start_threads(threads: int | None) -> int:
    """The root callback of both CLIs, before anything imports torch: this command's threads are `threads`
    (--threads), else OMP_NUM_THREADS, else `default_threads()` (the CPUs less those the load average
    says other jobs keep busy). A count below torch's own default (the affinity mask) is exported as
    OMP_NUM_THREADS, which torch reads on import and the processes the command starts inherit. Returns
    the count.

    It also makes idle OpenMP threads (libgomp, torch's on Linux) stop spinning sooner, unless the user
    set how they wait: beside one busy process on 2 cores, 2 threads ran a GAN-sized step at 727-743
    img/s (median) with GOMP_SPINCOUNT=10000 against 126-787 with libgomp's default, and at the same
    speed on the quiet machine (1,764-1,810 against 1,767-1,851); OMP_WAIT_POLICY=PASSIVE gave 892-1,003
    beside the busy process but lost 15% when quiet (benchmarks/bench_threads.py, BENCHMARKS.md)."""
    global _requested, _why, _note
    if not any(name in os.environ for name in OMP_WAIT_ENV):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    _requested = threads or _env_threads()
    chosen, _why = (_requested, "--threads or OMP_NUM_THREADS") if _requested else default_threads()
    if threads or chosen < _affinity_cpus():
        os.environ[THREADS_ENV] = str(chosen)
    chosen = _set_torch_threads(chosen, exact=_requested is not None)
    _note = _requested is None and chosen < available_cpus()
    return chosen


def threads_reason() -> str:
    """`2 torch thread(s) (the CPUs this process may use)`: this command's count and why."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else _requested or default_threads()[0]
    return f"{threads} torch thread(s) ({_why or default_threads()[1]})"


def threads_note() -> str | None:
    """`threads: 1 torch thread(s) (2 CPUs, and a load average of 1.9 says ...)` once, when the load lowered
    this command's threads (`start_threads`); then None. The first progress bar prints it."""
    global _note
    note, _note = (f"threads: {threads_reason()}" if _note else None), False
    return note


def limit_threads(workers: int) -> int:
    """Called as this process starts `workers` workers (processes or decode threads) that run beside it:
    lower torch's threads to `available_cpus() // (1 + workers)`, at least 1, unless the command asked for
    a count. Returns torch's count."""
    import torch

    explicit = _explicit_threads()
    if explicit is not None:
        return torch.get_num_threads()
    return _set_torch_threads(max(1, available_cpus() // (1 + workers)), exact=False)
