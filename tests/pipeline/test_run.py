"""`pipeline run` and `pipeline status`: staleness across stages, Dask, crashes and the cache lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import RUN_CONFIG as CONFIG
from typer.testing import CliRunner

from cli.pipeline import app
from manifests.lock import CacheLock
from world.synth import SynthConfig, run_synth

runner = CliRunner()
CLI = [sys.executable, "-c", "from cli.pipeline import main; main()"]


@pytest.fixture(scope="module")
def world_template(tmp_path_factory):
    out = tmp_path_factory.mktemp("template") / "world"
    run_synth(SynthConfig(out=out, n=48, shard_size=16, n_captions=120, image_size=32))
    return out


@pytest.fixture
def project(tmp_path, world_template, monkeypatch):
    shutil.copytree(world_template, tmp_path / "world")
    (tmp_path / "pipeline.toml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cli(*args, code=0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def _made(output: str) -> dict[str, int]:
    """stage -> shards made, from `pipeline run`'s summary lines."""
    made = {}
    for line in output.splitlines():
        stage, _, rest = line.partition(": ")
        if stage in ("embed", "captions", "index", "retrieve", "optimize"):
            made[stage] = int(rest.split()[0]) if rest.split()[0].isdigit() else " built," in rest
    return made


def _status():
    return {s["stage"]: s for s in json.loads(_cli("status", "--json"))}


def _outputs(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "cache").rglob("*.parquet"))
    }


def _tables(root):
    """Every Parquet output's content, less the `source` column (absolute paths differ between roots)."""
    tables = {}
    for path in sorted((root / "cache").rglob("*.parquet")):
        table = pq.read_table(path)
        tables[path.relative_to(root).as_posix()] = table.drop_columns(
            [c for c in ("source",) if c in table.column_names]
        )
    return tables


def test_full_run_then_noop(project):
    first = _made(_cli("run"))
    assert first == {"embed": 3, "captions": 1, "index": True, "retrieve": 3, "optimize": 3}
    assert all(not s["stale"] for s in _status().values())
    assert _made(_cli("run")) == {"embed": 0, "captions": 0, "index": False, "retrieve": 0, "optimize": 0}


def test_each_change_reruns_exactly_what_it_requires(project, world_template):
    _cli("run")
    # a changed optimize param: only optimize
    (project / "pipeline.toml").write_text(CONFIG.replace("steps = 3", "steps = 2"))
    status = _status()
    assert status["optimize"]["stale"] == {str(i): "params changed: steps" for i in range(3)}
    assert not status["embed"]["stale"] and not status["retrieve"]["stale"]
    assert _made(_cli("run")) == {"embed": 0, "captions": 0, "index": False, "retrieve": 0, "optimize": 3}

    # appended images: only the new shard, through every stage (keys 48-63: a cache's keys are unique)
    run_synth(SynthConfig(out=project / "more", n=64, seed=9, shard_size=16, n_captions=40, image_size=32))
    shutil.copy(project / "more" / "00003.tar", project / "world" / "00003.tar")
    status = _status()
    assert status["embed"]["stale"] == {"3": "new shard"}
    assert status["retrieve"]["stale"] == {"3": "upstream changed: embed"}
    assert _made(_cli("run")) == {"embed": 1, "captions": 0, "index": False, "retrieve": 1, "optimize": 1}

    # changed images (the same keys): one shard per stage
    shutil.copy(project / "more" / "00001.tar", project / "world" / "00001.tar")
    status = _status()
    assert status["embed"]["stale"] == {"1": "inputs changed"}
    assert status["optimize"]["stale"] == {"1": "upstream changed: embed"}
    assert _made(_cli("run")) == {"embed": 1, "captions": 0, "index": False, "retrieve": 1, "optimize": 1}

    # a changed caption corpus: index and every retrieve/optimize shard, no embed shard
    corpus = pq.read_table(project / "world" / "captions.parquet")
    extra = pa.table({"caption": ["one enormous pink elephant at the top"]}, schema=corpus.schema)
    pq.write_table(pa.concat_tables([corpus, extra]), project / "world" / "captions.parquet")
    status = _status()
    assert "corpus changed" in status["captions"]["note"]
    assert status["retrieve"]["stale"] == {str(i): "upstream changed: index" for i in range(4)}
    assert _made(_cli("run")) == {"embed": 0, "captions": 1, "index": True, "retrieve": 4, "optimize": 4}


def _line(output: str, start: str) -> str:
    """The summary line starting with `start` (not a progress bar's)."""
    return next(line for line in output.splitlines() if line.startswith(start) and "elapsed" not in line)


def test_run_prints_the_report_each_stage_command_prints(project):
    """One report per stage: `pipeline run`'s lines are the stage commands' (optimize's cos/InfoNCE line)."""
    ran = _cli("run")
    assert "InfoNCE" in _line(ran, "  cos(image, pseudo)")
    optimized = _cli("optimize")  # pipeline.toml's [optimize] section, as `pipeline run` reads it
    noop = _cli("run")
    assert _line(noop, "  cos(image, pseudo)") == _line(optimized, "  cos(image, pseudo)")
    assert _line(noop, "optimize: ").split(";")[:2] == _line(optimized, "optimize: ").split(";")[:2]
    embedded = _cli("embed", "world/*.tar")
    assert _line(noop, "embed: ").split(";")[:2] == _line(embedded, "embed: ").split(";")[:2]


def test_a_shard_remade_byte_identical_says_why_downstream_is_up_to_date(project):
    _cli("run")
    tar = project / "world" / "00001.tar"
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    output = _cli("run")
    note = "(embed shard 00001 remade with identical outputs)"
    assert _line(output, "embed: ").startswith("embed: 1 shard(s) made (00001 identical to before), 2 up to")
    assert _line(output, "retrieve: ").startswith(f"retrieve: 0 shard(s) made, 3 up to date {note};")
    assert _line(output, "optimize: ").startswith(f"optimize: 0 shard(s) made, 3 up to date {note};")
    assert note not in _cli("run"), "said once, by the run that remade it"


def test_status_reports_altered_and_missing_outputs(project):
    _cli("run")
    (project / "cache" / "retrieve" / "00002.parquet").unlink()
    out = project / "cache" / "optimize" / "00001.parquet"
    out.write_bytes(out.read_bytes() + b"x")
    status = _status()
    assert status["retrieve"]["stale"] == {"2": "output missing: retrieve/00002.parquet"}
    assert status["optimize"]["stale"]["1"] == "output altered: optimize/00001.parquet"
    assert status["optimize"]["stale"]["2"] == "upstream changed: retrieve"
    made = _made(_cli("run"))
    # retrieve shard 2 comes back byte-identical, so the cascade stops: optimize 2 is kept
    assert made["retrieve"] == 1 and made["optimize"] == 1


def test_until_and_force(project):
    assert set(_made(_cli("run", "--until", "embed"))) == {"embed"}
    assert _made(_cli("run", "--force", "embed", "--until", "embed")) == {"embed": 3}
    _cli("run", "--force", "nope", code=2)


def test_second_run_is_refused_while_the_lock_is_held(project):
    with CacheLock(project / "cache"):
        output = _cli("run", code=2)
    assert "in use by pid" in output
    _cli("run")


def test_lock_of_a_killed_run_is_taken_over(project):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from manifests.lock import CacheLock; "
            "CacheLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
            "cache",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    _cli("run", "--until", "embed", code=2)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    _cli("run", "--until", "embed")


@pytest.mark.parametrize(
    "point",
    ["embed:00002:before_manifest", "write:captions.faiss:before_replace", "optimize:00001:before_manifest"],
)
def test_sigkilled_run_then_rerun_gives_the_same_outputs(project, tmp_path_factory, point):
    clean = tmp_path_factory.mktemp("clean")
    shutil.copytree(project / "world", clean / "world")
    (clean / "pipeline.toml").write_text(CONFIG)
    subprocess.run([*CLI, "run"], cwd=clean, check=True, capture_output=True)
    env = {**os.environ, "PIPELINE_CRASH_AT": point}
    killed = subprocess.run([*CLI, "run"], cwd=project, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rerun = subprocess.run([*CLI, "run"], cwd=project, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    expected, got = _tables(clean), _tables(project)
    assert sorted(got) == sorted(expected)
    for name, table in expected.items():
        assert got[name].equals(table), name


def test_run_warns_what_a_stage_warns(project, monkeypatch):
    """A stage's warnings (retrieve: a recall target its index missed) reach `pipeline run`, as they reach
    the stage's own command."""
    import pipeline.run
    from pipeline.retrieve.stage import index_warnings

    missed = {"target_reached": False, "k": 4, "recall_at_k": 0.5, "target_recall": 0.9}
    assert index_warnings({**missed, "target_reached": True}) == []
    real = pipeline.run.run_pipeline

    def missing_the_target(configs, run, progress_factory=None):
        results = real(configs, run, progress_factory)
        results["retrieve"].warnings = index_warnings(missed)
        return results

    monkeypatch.setattr(pipeline.run, "run_pipeline", missing_the_target)
    with pytest.warns(UserWarning, match=r"index recall@4 0\.500 is below --target-recall 0\.9"):
        _cli("run")
