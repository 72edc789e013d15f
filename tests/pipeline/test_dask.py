"""The Dask executor: a LocalCluster run equals a local one and a killed worker's task is retried, for a
project decoding in-process and for the shipped defaults (`[embed] workers` > 0 inside daemonic Dask
worker processes).

Dask worker processes are daemonic and may not start children, so a DataLoader with worker processes
cannot run there; `shard_loader` decodes with threads instead and must give the same items and batches.
"""

from __future__ import annotations

import multiprocessing
import pickle
import shutil

import pytest
from factories import TINY_CLIP, image_bytes, write_tar

from inputs.sources import expand_inputs
from pipeline.embed.data import ShardSamples, shard_loader
from tests.pipeline.test_run import _cli, _made, _outputs, _status, project, world_template  # noqa: F401
from world.synth import SynthConfig, run_synth


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "world"
    run_synth(SynthConfig(out=out, n=32, shard_size=16, n_captions=80, image_size=32))
    return out


@pytest.fixture
def default_project(tmp_path, world, monkeypatch):
    """A project whose pipeline.toml is `pipeline init`'s, with only inputs, captions and CLIP set."""
    shutil.copytree(world, tmp_path / "world")
    monkeypatch.chdir(tmp_path)
    _cli("init")
    text = (tmp_path / "pipeline.toml").read_text()
    for default, ours in (
        ("inputs = []", 'inputs = ["world/*.tar"]'),
        ("captions = []", 'captions = ["world/captions.parquet"]'),
        ('clip_model = "ViT-B-32"', f'clip_model = "{TINY_CLIP}"'),
        ('clip_pretrained = "auto"', 'clip_pretrained = ""'),
    ):
        assert default in text, default
        text = text.replace(default, ours, 1)
    assert "# workers = " in text  # [embed] workers stays at its default, min(8, cores)
    (tmp_path / "pipeline.toml").write_text(text)
    return tmp_path


# test_run's project (embed decodes in-process, workers = 0) and `pipeline init`'s defaults (workers > 0)
PROJECTS = ["project", "default_project"]


def _shards(root) -> int:
    return len(list((root / "world").glob("*.tar")))


@pytest.mark.parametrize("which", PROJECTS)
def test_dask_local_cluster_gives_byte_identical_outputs(which, request):
    root = request.getfixturevalue(which)
    _cli("run")
    local = _outputs(root)
    shutil.rmtree(root / "cache")  # same paths again (the sidecars record each image's source)
    made = _made(_cli("run", "--executor", "dask", "--workers", "2"))
    n = _shards(root)
    assert made == {"embed": n, "captions": 1, "index": True, "retrieve": n, "optimize": n}
    assert _outputs(root) == local


@pytest.mark.parametrize("which", PROJECTS)
def test_dask_worker_killed_mid_task_is_retried(which, request, monkeypatch, tmp_path):
    root = request.getfixturevalue(which)
    monkeypatch.setenv("PIPELINE_CRASH_AT", "embed:00001:before_manifest")
    monkeypatch.setenv("PIPELINE_CRASH_ONCE", str(tmp_path / "crashed-once"))
    made = _made(_cli("run", "--executor", "dask", "--workers", "2", "--until", "embed"))
    assert (tmp_path / "crashed-once").exists()  # a worker really died
    assert made == {"embed": _shards(root)}
    assert not _status()["embed"]["stale"]


def _batches(dataset: ShardSamples, workers: int, batch_size: int) -> list[list[tuple]]:
    """Each batch as (index, key, stored bytes, meta, pixels) per item and (index, reason) per dropped one."""
    batches = []
    for ok, bad, pixels in shard_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=False):
        rows = [(it.index, it.key, it.image, it.meta, pixels[i].numpy().tobytes()) for i, it in enumerate(ok)]
        batches.append(rows + [(it.index, it.reason) for it in bad])
    return batches


def _batches_in_daemon(dataset: ShardSamples, workers: int, batch_size: int, out) -> None:
    assert multiprocessing.current_process().daemon
    out.write_bytes(pickle.dumps(_batches(dataset, workers, batch_size)))


# 16 samples: 2 workers of 8 make 3 batches each; 3 workers of 6, 5 and 5 make 2, 1 and 1.
@pytest.mark.parametrize("workers, batch_size", [(2, 3), (3, 5)])
def test_decoding_in_a_daemonic_process_gives_the_same_batches(tmp_path, workers, batch_size):
    members = [(f"{i:03d}.jpg", image_bytes((15 * i, 90, 40), size=(30 + i, 26))) for i in range(15)]
    tar = write_tar(tmp_path / "00000.tar", [*members[:9], ("broken.jpg", b"not an image"), *members[9:]])
    dataset = ShardSamples(
        expand_inputs([str(tar)]),
        image_size=24,
        image_format="jpg",
        quality=90,
        max_pixels=10**7,
        clip_size=24,
    )
    in_process = _batches(dataset, workers, batch_size)  # DataLoader worker processes
    child = multiprocessing.get_context("fork").Process(
        target=_batches_in_daemon, args=(dataset, workers, batch_size, tmp_path / "batches.pkl"), daemon=True
    )
    child.start()
    child.join(120)
    assert child.exitcode == 0
    in_daemon = pickle.loads((tmp_path / "batches.pkl").read_bytes())
    # The same items in the same batches (CLIP's output bits may depend on a batch's make-up), in order.
    assert in_daemon == in_process
    items = sorted(row for batch in in_process for row in batch)
    assert [row[0] for row in items] == list(range(16)) and items[9][1] == "undecodable"
    inline = sorted(row for batch in _batches(dataset, 0, batch_size) for row in batch)
    assert items == inline  # the items decoding in this process (workers=0) prepares
