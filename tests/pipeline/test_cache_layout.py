"""What a cache looks like from outside: stage folders that read as tables, and `pipeline status` on
any cache, configured or not."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def _invoke(*args, code=0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


@pytest.mark.parametrize(("stage", "rows"), [("captions", 120), ("retrieve", 48), ("optimize", 48)])
def test_a_parquet_stage_folder_reads_as_one_table(ran_project, stage, rows):
    table = pq.read_table(ran_project / "cache" / stage)  # stats and manifests live in _-folders
    assert table.num_rows == rows
    assert not [
        p
        for p in (ran_project / "cache" / stage).iterdir()
        if p.name[0] not in "._" and p.suffix != ".parquet"
    ]


def test_stats_in_the_old_layout_are_still_read_and_moved_by_the_next_run(ran_project):
    from pipeline.optimize import stage_summary

    stage = ran_project / "cache" / "optimize"
    for shard in range(3):
        (stage / "_stats" / f"{shard:05d}.json").rename(stage / f"{shard:05d}.stats.json")
    assert stage_summary(ran_project / "cache")["written"] == 48
    assert "0 shard(s) made, 3 up to date" in _invoke("optimize", "--steps", "3", "--batch-size", "16")
    assert sorted(p.name for p in (stage / "_stats").iterdir()) == ["00000.json", "00001.json", "00002.json"]
    assert not list(stage.glob("*.stats.json"))


def test_status_without_a_config_shows_every_stage_with_manifests(ran_project):
    (ran_project / "pipeline.toml").unlink()
    stages = {s["stage"]: s for s in json.loads(_invoke("status", "--json"))}
    assert stages["optimize"]["up_to_date"] == 3 and "not configured" in stages["optimize"]["note"]
    latents = ran_project / "cache" / "latents" / "abc123" / "_manifests"
    latents.mkdir(parents=True)
    stages = {s["stage"]: s for s in json.loads(_invoke("status", "--json"))}
    assert "latents/abc123" in stages


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_status_of_a_path_that_is_not_a_cache_is_one_line(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    if where == "empty":
        (tmp_path / "nocache").mkdir()
    output = _invoke("status", "--cache", "nocache", code=2)
    assert output.startswith("error: --cache nocache: ") and len(output.strip().splitlines()) == 1
    assert ("no such directory" if where == "missing" else "not a pipeline cache") in output


def _count_hashes(monkeypatch) -> list[str]:
    import manifests.manifest as manifest_module

    hashed, real = [], manifest_module.digest_file_content
    monkeypatch.setattr(manifest_module, "digest_file_content", lambda p: hashed.append(str(p)) or real(p))
    return hashed


def _outputs(cache) -> list:
    return [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".tar", ".parquet", ".faiss")]


@pytest.mark.parametrize("how", ["cp -r", "tar round trip"])
def test_a_copied_cache_is_accepted_with_one_hash_per_file(ran_project, monkeypatch, how):
    import subprocess

    if how == "cp -r":
        subprocess.run(["cp", "-r", "cache", "copy"], check=True)  # new mtimes, same bytes
    else:
        subprocess.run(["tar", "cf", "c.tar", "cache"], check=True)
        (ran_project / "restore").mkdir()
        subprocess.run(["tar", "xf", "../c.tar", "--touch"], cwd=ran_project / "restore", check=True)
        (ran_project / "restore" / "cache").rename(ran_project / "copy")
    hashed = _count_hashes(monkeypatch)
    stages = json.loads(_invoke("status", "--cache", "copy", "--json"))
    assert all(not s["stale"] for s in stages), stages
    assert sorted(set(hashed)) == sorted(hashed), "each file hashed once"
    assert len(hashed) >= len(_outputs(ran_project / "copy"))
    import manifests.manifest as manifest_module

    manifest_module.flush_stat_caches()  # what the process does at exit; the next process starts cold
    monkeypatch.setattr(manifest_module, "_STAT_CACHES", {})
    assert (ran_project / "copy" / "embed" / "_stat_cache.json").is_file()
    hashed.clear()
    output = _invoke("run", "--cache", "copy")
    assert "embed: 0 shard(s) made" in output and "optimize: 0 shard(s) made" in output
    assert hashed == [], "the stat cache makes later checks stat-only"


def test_a_real_change_in_a_copy_is_still_caught(ran_project):
    import subprocess

    subprocess.run(["cp", "-r", "cache", "copy"], check=True)
    sidecar = ran_project / "copy" / "optimize" / "00001.parquet"
    data = bytearray(sidecar.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, same size
    sidecar.write_bytes(bytes(data))
    stages = {s["stage"]: s for s in json.loads(_invoke("status", "--cache", "copy", "--json"))}
    assert stages["optimize"]["stale"] == {"1": "output altered: optimize/00001.parquet"}


def test_verify_rehashes_a_copy_that_the_stat_cache_already_vouched_for(ran_project):
    import subprocess

    subprocess.run(["cp", "-r", "cache", "copy"], check=True)
    assert all(not s["stale"] for s in json.loads(_invoke("status", "--cache", "copy", "--json")))
    sidecar = ran_project / "copy" / "optimize" / "00001.parquet"
    st = sidecar.stat()
    data = bytearray(sidecar.read_bytes())
    data[len(data) // 2] ^= 1  # bit rot after the copy was accepted: size and mtime kept
    sidecar.write_bytes(bytes(data))
    os.utime(sidecar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not {s["stage"]: s for s in json.loads(_invoke("status", "--cache", "copy", "--json"))}[
        "optimize"
    ]["stale"], "stat-only status trusts the remembered stat"
    verified = {s["stage"]: s for s in json.loads(_invoke("status", "--cache", "copy", "--json", "--verify"))}
    assert verified["optimize"]["stale"] == {"1": "output altered: optimize/00001.parquet"}
