"""Injected faults: a full disk, damaged JSON, bit rot, a deleted manifest and a held lock.

Each gives one line with exit code 2 (or a reason in `pipeline status`), never a traceback, and loses
nothing already committed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import TINY_CLIP
from typer.testing import CliRunner

from cli.pipeline import app
from manifests.faults import ENOSPC_ENV

runner = CliRunner()
EMBED = ["embed", "world/00000.tar", "world/00001.tar", "world/00002.tar", "--clip-model", TINY_CLIP]
EMBED += ["--clip-pretrained", "", "--image-size", "32", "--workers", "0"]


@pytest.fixture
def project(ran_project):
    return ran_project


def _cli(*args, code=0, env=None):
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors, output
    assert "Traceback" not in output, output
    return " ".join(output.split("error:", 1)[1].split())


def _status():
    return {s["stage"]: s for s in json.loads(_cli("status", "--json"))}


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def _rot(path: Path, everything: bool = False) -> None:
    """Flip 16 bytes in the middle of `path` (or all of them), keeping its size and mtime: what bit rot
    looks like to `stat`."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    start, end = (0, len(data)) if everything else (len(data) // 2, len(data) // 2 + 16)
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# --- a full disk -----------------------------------------------------------------------------------------


def test_disk_full_is_one_line_and_the_rerun_completes(project):
    shutil.rmtree(project / "cache")
    error = _one_line_error(_cli(*EMBED, "--cache", "cache", env={ENOSPC_ENV: "embed/00001.tar"}, code=2))
    assert error.startswith("cache cache: no space left on device writing cache/embed/00001.tar"), error
    assert "unfinished shard(s) need about" in error and "free space and rerun" in error
    assert not _temp_files(project / "cache")
    kept = json.loads((project / "cache/embed/_manifests/00000.json").read_text())
    output = _cli(*EMBED, "--cache", "cache")
    assert "2 shard(s) made, 1 up to date" in output
    assert json.loads((project / "cache/embed/_manifests/00000.json").read_text()) == kept


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_disk_full_on_a_real_small_tmpfs(project):
    disk = project / "small"
    if not _mount_tmpfs(disk, "80k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers it")
    try:
        result = runner.invoke(app, [*EMBED, "--cache", "small/cache"])
        assert result.exit_code == 2, result.output
        error = _one_line_error(result.output)
        assert error.startswith("cache small/cache: no space left on device writing"), error
        assert "need" in error
        assert not _temp_files(disk)
        committed = sorted(p.name for p in (disk / "cache/embed/_manifests").glob("*.json"))
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        output = _cli(*EMBED, "--cache", "small/cache")
        assert f"{len(committed)} up to date" in output
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_trainer_checkpoint_on_a_full_disk_is_one_line(project):
    from cli.trainers import app as trainers_app

    env = {ENOSPC_ENV: "0000001.pt"}
    args = ["gan", "--cache", "cache", "--size", "tiny", "--steps", "1", "--batch-size", "4"]
    result = runner.invoke(trainers_app, [*args, "--out", "runs", "--condition", "perturb"], env=env)
    assert result.exit_code == 2, result.output
    error = _one_line_error(result.output)
    assert "no space left on device writing" in error and "0000001.pt" in error, error


# --- damaged JSON ------------------------------------------------------------------------------------------


def test_damaged_plan_names_the_file_and_repair_rebuilds_it(project):
    plan = project / "cache/embed/_plan.json"
    original = json.loads(plan.read_text())
    plan.write_bytes(b"\xff\xfe garbage \x00\x01")
    for command in (["status"], ["run"]):
        error = _one_line_error(_cli(*command, code=2))
        assert "cache/embed/_plan.json: not valid JSON" in error and "--repair" in error, error
    output = _cli("run", "--repair")
    assert "embed: 0 shard(s) made, 3 up to date" in output, output
    assert json.loads(plan.read_text()) == original


def test_damaged_manifest_is_reported_and_its_shard_remade(project):
    (project / "cache/optimize/_manifests/00001.json").write_bytes(b"\x00\x9f{not json")
    assert _status()["optimize"]["stale"] == {"1": "manifest unreadable (damaged): shard will be remade"}
    assert "optimize: 1 shard(s) made" in _cli("run")


def test_deleted_manifest_is_manifest_missing_not_new_shard(project):
    (project / "cache/embed/_manifests/00002.json").unlink()
    (project / "cache/optimize/_manifests/00000.json").unlink()
    status = _status()
    assert status["embed"]["stale"] == {
        "2": "manifest missing (outputs exist without it): shard will be remade"
    }
    assert status["optimize"]["stale"]["0"].startswith("manifest missing")


@pytest.mark.parametrize(
    ("path", "command"),
    [
        ("cache/index/index.json", "run"),
        ("cache/optimize/_stats/00000.json", "optimize"),
        ("cache/captions/_corpus.json", "status"),
    ],
)
def test_damaged_side_files_name_the_file_and_the_fix(project, path, command):
    _rot(project / path, everything=True)
    error = _one_line_error(_cli(command, code=2))
    assert error.startswith(f"{path}: not valid JSON"), error
    assert "rerun" in error or "--verify" in error, error


# --- bit rot -----------------------------------------------------------------------------------------------


def test_status_verify_sees_bit_rot_and_run_verify_repairs_it(project):
    sidecar = project / "cache/embed/00001.parquet"
    good = sidecar.read_bytes()
    _rot(sidecar)
    assert not _status()["embed"]["stale"], "stat-only status cannot see bytes changed in place"
    verified = {s["stage"]: s for s in json.loads(_cli("status", "--json", "--verify"))}
    assert verified["embed"]["stale"] == {"1": "output damaged (content digest differs): embed/00001.parquet"}
    output = _cli("run", "--verify")
    assert "embed: 1 shard(s) made (00001 identical to before), 2 up to date" in output  # as committed
    assert sidecar.read_bytes() == good  # remade from the inputs, byte-identical
    assert not _status()["embed"]["stale"]


# --- the cache lock ----------------------------------------------------------------------------------------


@pytest.fixture
def held_lock(project):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from manifests.lock import CacheLock; "
            "CacheLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(float(sys.argv[2]))",
            "cache",
            "4",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    yield holder
    holder.kill()
    holder.wait()


@pytest.mark.parametrize(
    "command",
    [
        ["optimize", "--method", "perturb", "--force"],
        ["retrieve", "--captions", "world/captions.parquet", "--k", "4", "--force"],
        [*EMBED, "--force"],
    ],
    ids=["optimize", "retrieve", "embed"],
)
def test_stage_commands_refuse_a_locked_cache(project, held_lock, command):
    before = {p: p.read_bytes() for p in (project / "cache").rglob("_manifests/*.json")}
    error = _one_line_error(_cli(*command, code=2))
    assert "cache cache is in use by pid" in error and "--wait" in error, error
    assert before == {p: p.read_bytes() for p in (project / "cache").rglob("_manifests/*.json")}


def test_stage_command_waits_for_the_lock(project, held_lock):
    t0 = time.monotonic()
    output = _cli("optimize", "--method", "perturb", "--wait", "60")
    assert time.monotonic() - t0 > 1.0, "the holder sleeps 4 s: the command must have waited"
    assert "(perturb)" in output and "3 shard(s) made" in output
