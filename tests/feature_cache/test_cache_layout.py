"""What a cache looks like from outside: stage folders that read as tables, and `pipeline status` on
any cache, configured or not."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.pipeline import app

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


ROWS = {"embed": 48, "captions": 120, "retrieve": 48, "optimize": 48}


def _readme_table_reads() -> list[str]:
    """The pyarrow and pandas reads the README's "Reading a stage as a table" paragraph shows."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    paragraph = readme[readme.index("**Reading a stage as a table.**") :].split("\n\n")[0]
    return re.findall(r"`((?:pq\.read_table|pd\.read_parquet)\(.*?\))`", paragraph.replace("\n", " "))


def test_every_stage_folder_reads_as_one_table_as_the_readme_shows(ran_project):
    """Exactly the README's reads, embed's included (its folder also holds the .tar shards). The pandas
    ones run where pandas is installed (it is no dependency); pandas reads Parquet through pyarrow."""
    import glob
    import importlib.util

    reads = {
        stage: [r for r in _readme_table_reads() if f'cache/{stage}"' in r or f"cache/{stage}/" in r]
        for stage in ROWS
    }
    assert any(r.startswith("pq.") for r in reads["embed"]), "the README shows how to read embed/ as a table"
    pd = importlib.import_module("pandas") if importlib.util.find_spec("pandas") else None
    for stage, expressions in reads.items():
        for expression in expressions:
            if expression.startswith("pd.") and pd is None:
                continue
            table = eval(expression, {"pq": pq, "pd": pd, "glob": glob})  # noqa: S307 (the README's text)
            assert len(table) == ROWS[stage], expression


def test_stats_in_the_old_layout_are_still_read_and_moved_by_the_next_run(ran_project):
    from pipeline.optimize.stage import stage_summary

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


def _stages(*args) -> dict[str, dict]:
    return {s["stage"]: s for s in json.loads(_invoke("status", *args, "--json"))}


def test_status_without_a_config_sees_new_and_changed_images_from_the_recorded_inputs(
    ran_project, tmp_path, monkeypatch
):
    """`pipeline run` recorded its [embed] inputs in the cache, absolute: status needs no pipeline.toml,
    from any directory."""
    from factories import image_bytes, write_tar

    (ran_project / "pipeline.toml").unlink()
    monkeypatch.chdir(tmp_path)
    cache = str(ran_project / "cache")
    stages = _stages("--cache", cache)
    assert (stages["embed"]["up_to_date"], stages["embed"]["stale"]) == (3, {})
    assert stages["embed"]["note"] == f"inputs as the last embed run recorded them: {ran_project}/world/*.tar"
    tar = ran_project / "world" / "00001.tar"
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    write_tar(
        ran_project / "world" / "00003.tar",
        [("new0.jpg", image_bytes()), ("new1.png", image_bytes(fmt="PNG"))],
    )
    stages = _stages("--cache", cache)
    assert stages["embed"]["stale"] == {"1": "inputs changed", "3": "new shard"}
    assert stages["retrieve"]["stale"] == {"1": "upstream changed: embed", "3": "upstream changed: embed"}
    assert stages["optimize"]["stale"] == {"1": "upstream changed: embed", "3": "upstream changed: embed"}


def test_status_compares_pipeline_tomls_inputs_when_there_is_one(ran_project):
    toml = ran_project / "pipeline.toml"
    toml.write_text(toml.read_text().replace('"world/*.tar"', '"world/0000[01].tar"'))
    stages = _stages()
    assert stages["embed"]["stale"] == {"2": "inputs changed"} and stages["embed"]["note"] == ""


def test_status_of_another_cache_than_pipeline_tomls(ran_project, tmp_path):
    """An explicit --cache that holds no cache is one line and exit 2, not every shard listed as new; a
    cache that is not pipeline.toml's says which inputs it is compared with."""
    output = _invoke("status", "--cache", str(tmp_path), code=2)
    assert output == (
        f"error: --cache {tmp_path}: no pipeline cache here (no embed/ folder); "
        "pipeline.toml's cache is cache\n"
    )
    other = tmp_path / "other"
    shutil.copytree(ran_project / "cache", other)
    record = json.loads((other / "embed" / "_inputs.json").read_text())
    (other / "embed" / "_inputs.json").write_text(json.dumps({**record, "inputs": ["/data/elsewhere/*.tar"]}))
    stages = _stages("--cache", str(other))
    assert stages["embed"]["note"] == (
        "inputs from pipeline.toml, whose cache is cache: world/*.tar; this cache was last embedded from "
        "/data/elsewhere/*.tar"
    )
    assert all(not s["stale"] for s in stages.values())  # the same inputs as the toml's own cache, copied
    assert _invoke("status", "--cache", "./cache/../cache").startswith(
        "embed "
    )  # the toml's, spelled otherwise


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_status_of_a_path_that_is_not_a_cache_is_one_line(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    if where == "empty":
        (tmp_path / "nocache").mkdir()
    output = _invoke("status", "--cache", "nocache", code=2)
    assert output.startswith("error: --cache nocache: ") and len(output.strip().splitlines()) == 1
    assert (
        "no such directory" if where == "missing" else "no pipeline cache here (no embed/ folder)"
    ) in output


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
