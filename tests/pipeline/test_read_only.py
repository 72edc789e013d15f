"""A cache on a read-only file system: every command that writes it stops with one line and exit code 2
naming the cache, before doing anything; the commands that only read it work.

The cache is made read-only by a real bind mount (`mount --bind -o ro`) inside a user and mount namespace
(`unshare`), so nothing outside the test sees it; where namespaces are not allowed the test is skipped.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from factories import RUN_CONFIG
from typer.testing import CliRunner

from cli.trainers import app as trainers_app
from manifests.lock import CacheLock, NotWritable
from world.synth import SynthConfig, run_synth

PIPELINE = [sys.executable, "-c", "from cli.pipeline import main; main()"]
TRAINERS = [sys.executable, "-c", "from cli.trainers import main; main()"]
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]

# Run inside the namespace: mount the cache read-only over itself, then run each command.
DRIVER = """
import json, subprocess, sys
cache, cwd, commands = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "--bind", "-o", "ro", cache, cache], check=True)
done = [subprocess.run(c, cwd=cwd, capture_output=True, text=True) for c in commands]
print(json.dumps([[d.returncode, d.stdout, d.stderr] for d in done]))
"""


def namespaces_allowed(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    try:
        done = subprocess.run(
            [*UNSHARE, "mount", "--bind", "-o", "ro", str(probe), str(probe)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A synthetic world run through every stage, and a one-step VAE of it (outside the cache)."""
    root = tmp_path_factory.mktemp("read-only")
    if not namespaces_allowed(root):
        pytest.skip("user and mount namespaces are not allowed here (unshare), so no read-only mount")
    run_synth(SynthConfig(out=root / "world", n=16, shard_size=8, n_captions=40, image_size=32))
    (root / "pipeline.toml").write_text(RUN_CONFIG)  # paths relative to root
    done = subprocess.run([*PIPELINE, "run"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    args = ["vae", "--cache", root / "cache", "--out", root / "runs", "--size", "tiny", "--steps", 1]
    args += ["--batch-size", 4, "--eval-n", 4, "--device", "cpu", "--allow-partial"]
    result = CliRunner().invoke(trainers_app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return root


def run_read_only(cache: Path, commands: list[list[str]]) -> list[tuple[int, str, str]]:
    done = subprocess.run(
        [*UNSHARE, sys.executable, "-c", DRIVER, str(cache), str(cache.parent), json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return [tuple(d) for d in json.loads(done.stdout)]


def test_writing_commands_stop_with_one_line_and_readers_work(project):
    cache = project / "cache"
    (vae,) = (project / "runs").glob("*-vae/0000001.pt")
    before = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    writers = {
        "pipeline run": [*PIPELINE, "run"],
        "pipeline run --verify": [*PIPELINE, "run", "--verify"],
        "pipeline embed": [*PIPELINE, "embed", f"{project}/world/*.tar", "--cache", str(cache)]
        + ["--clip-model", "lafite-tiny", "--clip-pretrained", "", "--image-size", "32", "--workers", "0"],
        "pipeline optimize": [*PIPELINE, "optimize", "--cache", str(cache)],
        "trainers vae --encode": [*TRAINERS, "vae", "--encode", str(vae), "--cache", str(cache)]
        + ["--device", "cpu"],
        "trainers compare into the cache": [*TRAINERS, "compare", "--cache", str(cache)]
        + ["--out", str(cache / "compare"), "--features-only", "--device", "cpu"],
    }
    readers = {
        "pipeline status": [*PIPELINE, "status", "--cache", str(cache)],
        "pipeline status --verify": [*PIPELINE, "status", "--cache", str(cache), "--verify"],
        "pipeline run --dry-run": [*PIPELINE, "run", "--dry-run"],
        "trainers gan": [*TRAINERS, "gan", "--cache", str(cache), "--out", str(project / "runs")]
        + ["--size", "tiny", "--steps", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0"],
    }
    results = run_read_only(cache, list(writers.values()) + list(readers.values()))
    for name, (code, out, err) in zip(writers, results, strict=False):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, f"{name}: exit {code}\n{out}\n{err}"
        assert "cannot be written (read-only file system" in lines[0], f"{name}: {lines[0]}"
        assert str(cache) in lines[0] and "Traceback" not in err, f"{name}: {lines[0]}"
    for name, (code, out, err) in zip(readers, results[len(writers) :], strict=True):
        assert code == 0, f"{name}: exit {code}\n{out}\n{err}"
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == before


def test_the_lock_of_a_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    real_open = __import__("os").open

    def read_only(path, flags, *args):
        if str(path).startswith(str(tmp_path)) and flags & __import__("os").O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr("os.open", read_only)
    with pytest.raises(NotWritable, match=f"{tmp_path} cannot be written \\(read-only file system: "):
        CacheLock(tmp_path).acquire()
    shutil.rmtree(tmp_path, ignore_errors=True)
