"""trainers.data.loader: the cache loader joins every image with its own key's condition, mixes real captions,
resumes exactly, refuses missing stages, waits for or refuses a partial cache (or records it with
allow_partial), names damaged files in one line, and never writes outside `_trainers/`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from factories import TINY_CLIP, embed_config, flip_middle
from PIL import Image
from typer.testing import CliRunner

from cli.trainers import app
from core.errors import ConfigError
from feature_cache.embed_rows import cache_clip, feature_dim
from feature_cache.tar_images import TarImages, _index_tar_slow, index_tar
from manifests import (
    Dep,
    ShardSpec,
    commit_manifest,
    digest_json,
    list_manifests,
    stat_out,
    write_bytes_atomic,
    write_parquet_atomic,
)
from manifests.errors import Unreadable
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import run_embed
from trainers.data import conditions, store_files
from trainers.data import loader as data
from trainers.data.conditions import missing_stage_error
from trainers.data.loader import LoaderConfig, make_loader
from trainers.data.sample_store import AllRows, RowFile, StoredRows
from world.synth import SynthConfig, run_synth

N_IMAGES, SHARD, D = 40, 20, 64
DROPPED_KEY = "000000003"  # the optimize fixture has no row for it
NO_NEIGHBOUR_KEY = "000000025"  # its retrieve row has only missing neighbours (-1)


def unit(key: str, salt: str, dim: int = D) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float16)


def commit_stage(cache: Path, stage: str, shard: int, table, deps: list[Dep]) -> None:
    rel = f"{stage}/{shard:05d}.parquet"
    size, digest = write_parquet_atomic(cache / rel, table)
    spec = ShardSpec(stage, shard, "1", {"fixture": True}, deps)
    commit_manifest(cache, spec, [stat_out(cache, rel, size, digest, table.num_rows)], {})


def embed_dep(cache: Path, shard: int) -> Dep:
    out = next(o for o in list_manifests(cache, "embed")[shard]["outs"] if o["path"].endswith(".parquet"))
    return Dep(out["path"], out["digest"])


def fixed(vectors: np.ndarray, dtype) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), dtype), vectors.shape[1])


def embed_keys(cache: Path, shard: int) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(cache / "embed" / f"{shard:05d}.parquet", columns=["key"])["key"].to_pylist()


CAPTION_IDS = np.arange(30, dtype=np.int64) * 3 + 7  # not 0..M-1: the join must go through caption_id


def write_stage_fixtures(cache: Path) -> dict:
    """optimize/, captions/ (two shards), retrieve/ built by hand; returns the expected features by key."""
    expected = {"optimize": {}, "neighbours": {}}
    cap_emb = np.stack([unit(str(i), "caption") for i in CAPTION_IDS])
    for j, part in enumerate((slice(0, 18), slice(18, 30))):
        table = pa.table(
            {
                "caption_id": pa.array(CAPTION_IDS[part], pa.int64()),
                "text": pa.array([f"caption {i}" for i in CAPTION_IDS[part]], pa.string()),
                "txt_emb": fixed(cap_emb[part], pa.float16()),
            }
        )
        commit_stage(cache, "captions", j, table, [])
    expected["captions"] = dict(zip(CAPTION_IDS.tolist(), cap_emb, strict=True))
    for shard in (0, 1):
        keys = embed_keys(cache, shard)
        kept = [k for k in keys if k != DROPPED_KEY][::-1]  # another order than embed's: join by key
        pseudo = np.stack([unit(k, "pseudo") for k in kept])
        expected["optimize"].update(zip(kept, pseudo, strict=True))
        table = pa.table(
            {
                "key": pa.array(kept, pa.string()),
                "pseudo_txt": fixed(pseudo, pa.float16()),
                "cos_init": pa.array(np.zeros(len(kept)), pa.float32()),
                "cos_final": pa.array(np.zeros(len(kept)), pa.float32()),
                "method": pa.array(["optimize"] * len(kept), pa.string()),
            }
        )
        commit_stage(cache, "optimize", shard, table, [embed_dep(cache, shard)])
        ids, sims = [], []
        for key in keys:
            i = int(key)
            row_ids = [int(CAPTION_IDS[(i * 7 + t) % 30]) for t in range(4)]
            row_sims = [0.30 - 0.01 * t + 0.001 * (i % 5) for t in range(4)]
            if i % 3 == 0:
                row_ids[3] = -1  # a missing neighbour is masked out
            if key == NO_NEIGHBOUR_KEY:
                row_ids = [-1] * 4
            ids.append(row_ids)
            sims.append(row_sims)
            expected["neighbours"][key] = (row_ids, row_sims)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "nbr_ids": fixed(np.array(ids, np.int64), pa.int64()),
                "nbr_sims": fixed(np.array(sims, np.float32), pa.float32()),
            }
        )
        commit_stage(cache, "retrieve", shard, table, [embed_dep(cache, shard)])
    return expected


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    run_synth(SynthConfig(out=out, n=N_IMAGES, shard_size=SHARD, n_captions=40, image_size=32))
    return out


def embed(world: Path, cache: Path) -> Path:
    run_embed(embed_config([world / "*.tar"], cache, batch_size=64))
    return cache


@pytest.fixture(scope="module")
def cache(world, tmp_path_factory):
    cache = embed(world, tmp_path_factory.mktemp("cache"))
    return cache, write_stage_fixtures(cache)


@pytest.fixture
def scratch(cache, tmp_path) -> Path:
    """A private copy of the full cache (copy2 keeps sizes and mtimes), for tests that damage it."""
    return Path(shutil.copytree(cache[0], tmp_path / "cache"))


def tar_images(cache: Path) -> dict[str, np.ndarray]:
    images = {}
    for path in sorted((cache / "embed").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
                    images[member.name[: -len(".jpg")]] = img.transpose(2, 0, 1) / 127.5 - 1.0
    return images


def sidecar(cache: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    rows = {}
    for path in sorted((cache / "embed").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["key"]] = row
    return rows


def expected_retrieve(expected: dict, key: str, tau_r: float) -> np.ndarray:
    ids, sims = expected["neighbours"][key]
    valid = [i for i, c in enumerate(ids) if c != -1]
    logits = np.array([sims[i] / tau_r for i in valid])
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    h = sum(w * expected["captions"][ids[i]].astype(np.float32) for w, i in zip(weights, valid, strict=True))
    return h / np.linalg.norm(h)


def caption_features(cache: Path) -> dict[str, np.ndarray]:
    from core.clip import cached_clip, encode_texts

    rows = sidecar(cache)
    bundle = cached_clip(TINY_CLIP, "", "cpu")
    keys = sorted(k for k, r in rows.items() if r["caption"])
    feats = encode_texts(bundle, [rows[k]["caption"] for k in keys]).numpy()
    return dict(zip(keys, feats, strict=True))


def one_epoch(config: LoaderConfig) -> tuple[list[dict], data.LoaderInfo]:
    loader = make_loader(config)
    n = loader.info.n_images
    assert n % config.batch_size == 0, "pick a batch size that divides the set, so a batch is one epoch's"
    return [next(loader) for _ in range(n // config.batch_size)], loader.info


@pytest.mark.parametrize("condition", ["optimize", "retrieve", "perturb", "caption"])
def test_every_image_gets_its_own_keys_feature(cache, condition):
    cache_dir, expected = cache
    images = tar_images(cache_dir)
    rows = sidecar(cache_dir)
    captions = caption_features(cache_dir) if condition == "caption" else None
    xi = 0.0 if condition == "perturb" else 3.0  # xi = 0: the perturbed feature is the image's own f
    size = {"optimize": 13, "retrieve": 13, "perturb": 8, "caption": 8}[condition]
    batches, info = one_epoch(LoaderConfig(cache=cache_dir, condition=condition, batch_size=size, xi=xi))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == info.n_images  # one epoch: every sample exactly once
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 32, 32)
        assert batch["cond"].dtype == torch.float32 and batch["cond"].shape[1] == D
        assert torch.allclose(batch["cond"].norm(dim=1), torch.ones(len(batch["key"])), atol=1e-5)
        assert batch["paired"].dtype == torch.bool
        for key, image, cond, paired in zip(
            batch["key"], batch["image"], batch["cond"], batch["paired"], strict=True
        ):
            # The decoders differ in rounding only: its own image is within a level, any other far off.
            assert np.abs(image.numpy() - images[key]).mean() < 0.02
            other = images[next(k for k in images if k != key)]
            assert np.abs(image.numpy() - other).mean() > 0.05
            if condition == "optimize":
                want = expected["optimize"][key].astype(np.float32)
            elif condition == "retrieve":
                want = expected_retrieve(expected, key, 0.05)
            elif condition == "perturb":
                want = np.asarray(rows[key]["img_emb"], np.float32)
            else:
                want = captions[key]
            want = want / np.linalg.norm(want)
            np.testing.assert_allclose(cond.numpy(), want, atol=2e-3)
            assert bool(paired) == (condition == "caption")
    if condition == "optimize":
        assert DROPPED_KEY not in keys and info.excluded == {"no_optimize_row": 1}
    elif condition == "retrieve":
        assert NO_NEIGHBOUR_KEY not in keys and info.excluded == {"no_usable_neighbours": 1}
    else:
        assert info.n_images == N_IMAGES and info.excluded == {}


def test_retrieve_mix_uses_tau_r(cache):
    cache_dir, expected = cache
    batches, _ = one_epoch(LoaderConfig(cache=cache_dir, condition="retrieve", batch_size=39, tau_r=1.0))
    batch = batches[0]
    key = batch["key"][0]
    np.testing.assert_allclose(batch["cond"][0].numpy(), expected_retrieve(expected, key, 1.0), atol=2e-3)
    sharp = expected_retrieve(expected, key, 0.05)
    assert np.abs(batch["cond"][0].numpy() - sharp).max() > 1e-2  # tau_r changed the mix


def test_perturb_noise_is_fresh_per_epoch_and_seeded(cache):
    cache_dir, _ = cache
    rows = sidecar(cache_dir)

    def two_epochs(seed):
        loader = make_loader(
            LoaderConfig(cache=cache_dir, condition="perturb", batch_size=N_IMAGES, seed=seed)
        )
        return [
            {k: c for k, c in zip(b["key"], b["cond"], strict=True)} for b in (next(loader), next(loader))
        ]

    first, again, other = two_epochs(0), two_epochs(0), two_epochs(1)
    cosines = []
    for key in first[0]:
        f = torch.tensor(np.asarray(rows[key]["img_emb"], np.float32))
        cosines.append(float(first[0][key] @ (f / f.norm())))
        assert not torch.allclose(first[0][key], first[1][key])  # fresh noise in epoch 1
        assert torch.equal(first[0][key], again[0][key]) and torch.equal(first[1][key], again[1][key])
        assert not torch.allclose(first[0][key], other[0][key])
    # xi = 3: cos(h, f) = (1 + 3c) / sqrt(10 + 6c) with c = cos(eps, f) ~ N(0, 1/64): ~0.32 on average
    assert 0.25 < np.mean(cosines) < 0.40 and max(cosines) < 0.9, cosines


def test_paired_fraction_mixes_real_caption_features(cache):
    cache_dir, expected = cache
    captions = caption_features(cache_dir)
    loader = make_loader(
        LoaderConfig(cache=cache_dir, condition="optimize", batch_size=39, paired_fraction=0.5)
    )
    assert loader.info.paired_pool == 39 and loader.info.paired_probability == 0.5
    flags = []
    for _ in range(8):
        batch = next(loader)
        for key, cond, paired in zip(batch["key"], batch["cond"], batch["paired"], strict=True):
            want = captions[key] if paired else expected["optimize"][key].astype(np.float32)
            np.testing.assert_allclose(cond.numpy(), want / np.linalg.norm(want), atol=2e-3)
            flags.append(bool(paired))
    assert 0.4 < np.mean(flags) < 0.6, np.mean(flags)


def test_paired_limit_pairs_a_fixed_few_images_always(cache):
    cache_dir, _ = cache
    loader = make_loader(LoaderConfig(cache=cache_dir, condition="perturb", batch_size=20, paired_limit=5))
    assert loader.info.paired_pool == 5 and loader.info.paired_probability == 1.0
    paired_keys, unpaired_keys = set(), set()
    for _ in range(6):  # three epochs
        batch = next(loader)
        for key, paired in zip(batch["key"], batch["paired"], strict=True):
            (paired_keys if paired else unpaired_keys).add(key)
    assert len(paired_keys) == 5 and not paired_keys & unpaired_keys
    few_shot = make_loader(LoaderConfig(cache=cache_dir, condition="caption", batch_size=5, paired_limit=5))
    assert few_shot.info.n_images == 5 and few_shot.info.excluded == {"beyond_paired_limit": N_IMAGES - 5}
    assert set(next(few_shot)["key"]) == paired_keys  # the same seeded choice of N images


def test_start_step_resumes_with_identical_batches_without_decoding_skipped_ones(cache, monkeypatch):
    cache_dir, _ = cache
    config = LoaderConfig(cache=cache_dir, condition="perturb", batch_size=7, paired_fraction=0.3, seed=3)
    fresh = make_loader(config)
    reference = [next(fresh) for _ in range(12)]  # crosses epoch boundaries (40 images, batches of 7)
    decoded = []
    original = TarImages.decode
    monkeypatch.setattr(
        TarImages,
        "decode",
        lambda self, raw, what: decoded.append(what) or original(self, raw, what),
    )
    resumed = make_loader(config, start_step=9)
    for step in range(9, 12):
        batch = next(resumed)
        assert batch["key"] == reference[step]["key"]
        assert torch.equal(batch["image"], reference[step]["image"])
        assert torch.equal(batch["cond"], reference[step]["cond"])
        assert torch.equal(batch["paired"], reference[step]["paired"])
    assert len(decoded) == 3 * 7  # only the images of the batches it yielded
    decoded.clear()
    far = make_loader(config, start_step=10**9)  # index arithmetic: no epochs replayed
    assert len(next(far)["key"]) == 7 and len(decoded) == 7


def test_worker_processes_give_the_same_batches(cache):
    cache_dir, _ = cache
    config = LoaderConfig(cache=cache_dir, condition="perturb", batch_size=10, paired_fraction=0.5)
    serial = make_loader(config)
    parallel = make_loader(LoaderConfig(**{**config.__dict__, "workers": 2}))
    for _ in range(5):
        a, b = next(serial), next(parallel)
        assert (
            a["key"] == b["key"] and torch.equal(a["cond"], b["cond"]) and torch.equal(a["image"], b["image"])
        )


def test_missing_stages_name_the_command_to_run(world, tmp_path):
    with pytest.raises(ConfigError, match="pipeline embed"):
        make_loader(LoaderConfig(cache=tmp_path / "nowhere", condition="perturb"))
    bare = embed(world, tmp_path / "bare")
    for condition, command in (("optimize", "pipeline optimize"), ("retrieve", "pipeline retrieve")):
        with pytest.raises(ConfigError, match=command) as info:
            make_loader(LoaderConfig(cache=bare, condition=condition))
        assert "\n" not in str(info.value)
    assert "pipeline optimize" in str(missing_stage_error(bare, "optimize"))
    assert make_loader(LoaderConfig(cache=bare, condition="perturb")).info.n_images == N_IMAGES


def partial(scratch: Path, condition: str, **kwargs) -> LoaderConfig:
    """allow_partial, no wait: what these tests look at is which shards are left out."""
    return LoaderConfig(cache=scratch, condition=condition, allow_partial=True, partial_wait_s=0, **kwargs)


def test_only_committed_intact_current_shards_are_read(scratch):
    manifest = scratch / "optimize" / "_manifests" / "00001.json"
    manifest.unlink()  # shard 1's output exists but is not committed
    with pytest.raises(ConfigError, match="not made yet [(]1[)].*pipeline optimize.*--allow-partial"):
        make_loader(LoaderConfig(cache=scratch, condition="optimize", partial_wait_s=0))
    with pytest.warns(UserWarning, match="leaving out optimize shards: not made yet"):
        loader = make_loader(partial(scratch, "optimize", batch_size=19))
    assert loader.info.skipped_shards == {"optimize": {1: "not made yet"}}
    assert loader.info.n_images == SHARD - 1
    assert all(int(k) < SHARD for k in next(loader)["key"])

    with open(scratch / "optimize" / "00000.parquet", "ab") as f:
        f.write(b"being rewritten")  # size no longer matches the manifest: never read
    with pytest.raises(ConfigError, match="pipeline optimize.*--allow-partial cannot help"):
        make_loader(partial(scratch, "optimize"))  # nothing usable is left: refused even so

    stale = json.loads((scratch / "retrieve" / "_manifests" / "00000.json").read_text())
    stale["deps"][0]["digest"] = "0" * 32  # made from an older embed shard 0
    (scratch / "retrieve" / "_manifests" / "00000.json").write_text(json.dumps(stale))
    with pytest.raises(ConfigError, match="stale.*pipeline retrieve"):
        make_loader(LoaderConfig(cache=scratch, condition="retrieve", partial_wait_s=0))
    with pytest.warns(UserWarning, match="stale"):
        loader = make_loader(partial(scratch, "retrieve", batch_size=4))
    assert loader.info.skipped_shards == {"retrieve": {0: "made from an older embed shard (stale)"}}
    assert all(int(k) >= SHARD for k in next(loader)["key"])

    with open(scratch / "embed" / "00001.tar", "ab") as f:
        f.write(b"\0" * 512)  # embed is rewriting shard 1
    with pytest.raises(ConfigError, match="embed shards: file size differs from the manifest's [(]1[)]"):
        make_loader(LoaderConfig(cache=scratch, condition="perturb", partial_wait_s=0))
    with pytest.warns(UserWarning, match="leaving out embed shards"):
        loader = make_loader(partial(scratch, "perturb", batch_size=4))
    assert loader.info.skipped_shards == {
        "embed": {1: "files missing or being rewritten (size differs from the manifest)"}
    }
    assert loader.info.n_images == SHARD and loader.info.shards == {"embed": [0]}


def test_a_shard_committed_during_the_wait_is_used(scratch):
    shutil.rmtree(scratch / "_trainers", ignore_errors=True)  # no stored sample set: the stage is read
    path = scratch / "optimize" / "00001.parquet"
    committed = path.read_bytes()
    path.write_bytes(committed + b"half of a rewrite")

    def commit():  # the running stage finishes its rewrite (the same bytes again)
        time.sleep(0.6)
        write_bytes_atomic(path, committed)

    writer = threading.Thread(target=commit)
    writer.start()
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="waiting up to 20 s for optimize shards: file missing or being"):
        loader = make_loader(
            LoaderConfig(cache=scratch, condition="optimize", batch_size=13, partial_wait_s=20)
        )
    writer.join()
    assert time.monotonic() - t0 >= 0.6  # it waited, then read the shard whole (not skipped at the timeout)
    assert loader.info.skipped_shards == {} and loader.info.n_images == N_IMAGES - 1
    assert loader.info.record()["partial"] is False


runner = CliRunner()


def gan_args(cache: Path, out: Path, condition: str, *extra) -> list[str]:
    args = ["gan", "--cache", cache, "--out", out, "--size", "tiny", "--condition", condition, "--steps", 1]
    args += ["--batch-size", 4, "--sample-every", 0, "--checkpoint-every", 1, "--device", "cpu", *extra]
    return [str(a) for a in args]


def one_line_error(result) -> str:
    """The CLI's refusal: exit code 2 and one line (besides warnings), never a traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_shard_being_rewritten_is_refused_after_the_wait(scratch, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PARTIAL_WAIT_S", 0.5, raising=False)
    with open(scratch / "optimize" / "00001.parquet", "ab") as f:
        f.write(b"being rewritten")  # its size differs from the manifest
    t0 = time.monotonic()
    line = one_line_error(runner.invoke(app, gan_args(scratch, tmp_path / "runs", "optimize")))
    assert time.monotonic() - t0 >= 0.5
    assert "after waiting" in line and "optimize shards: file size differs from the manifest's (1)" in line
    assert f"pipeline optimize --cache {scratch}" in line and "--allow-partial" in line
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_truncated_or_missing_shard_file_is_named_with_its_fix(scratch, tmp_path, monkeypatch, damage):
    monkeypatch.setattr(data, "PARTIAL_WAIT_S", 0, raising=False)
    path = scratch / "optimize" / "00001.parquet"
    size = path.stat().st_size
    if damage == "truncated":
        os.truncate(path, size // 2)  # not being rewritten: no stage is running
    else:
        path.unlink()
    line = one_line_error(runner.invoke(app, gan_args(scratch, tmp_path / "runs", "optimize")))
    assert f"`pipeline optimize --cache {scratch}`" in line  # a rerun remakes it either way
    verify = f"`pipeline run --cache {scratch} --verify`, which re-hashes every output and remakes damaged"
    if damage == "truncated":
        assert "optimize shards: file size differs from the manifest's (1)" in line
        assert f"{path} is {size // 2:,} bytes where its manifest says {size:,}" in line and verify in line
    else:
        assert "optimize shards: file missing (1)" in line and f"{path} is missing" in line
        assert "--verify" not in line


def test_allow_partial_trains_on_the_rest_and_records_the_rows(scratch, tmp_path):
    from trainers.eval.config import EvalConfig
    from trainers.eval.evaluate import evaluate
    from trainers.families.load import load_generator

    with open(scratch / "optimize" / "00001.parquet", "ab") as f:
        f.write(b"being rewritten")
    with pytest.warns(UserWarning, match="leaving out optimize shards: file missing or being rewritten"):
        result = runner.invoke(app, gan_args(scratch, tmp_path, "optimize", "--allow-partial"))
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "000-gan" / "config.json").read_text())["data"]
    used = [k for k in embed_keys(scratch, 0) if k != DROPPED_KEY]  # shard 0, in sample order
    assert recorded.pop("provenance")["stage"] == "optimize"  # contents: test_variants.py
    assert recorded == {
        "condition": "optimize",
        "n_images": len(used),
        "partial": True,
        "shards": {"embed": [0, 1], "optimize": [0]},
        "skipped_shards": {"optimize": {"1": "file missing or being rewritten"}},
        "excluded": {"no_optimize_row": 1, "optimize_shard_not_usable": SHARD},
        "keys_digest": digest_json(used),
        "pairs": 0,
        "pairs_digest": None,
    }
    generate, info = load_generator(tmp_path / "000-gan", device="cpu")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n")
    config = EvalConfig("run", scratch, tmp_path / "eval", prompts=prompts, n=8, device="cpu", grid=0)
    evaluate(config, generate, info)
    training_data = json.loads((tmp_path / "eval" / "eval.json").read_text())["training_data"]
    assert training_data.pop("provenance")["stage"] == "optimize" and training_data == recorded


@pytest.mark.parametrize(
    "rel, condition", [("embed/00000.parquet", "perturb"), ("optimize/00001.parquet", "optimize")]
)
def test_bit_rot_in_a_committed_file_is_one_line_naming_it_and_verify(scratch, tmp_path, rel, condition):
    # the loader that derives the sample set hashes what it reads; later ones read the stored set
    shutil.rmtree(scratch / "_trainers", ignore_errors=True)
    flip_middle(scratch / rel)
    line = one_line_error(runner.invoke(app, gan_args(scratch, tmp_path, condition)))
    assert str(scratch / rel) in line and f"pipeline run --cache {scratch} --verify" in line


def tar_member(tar: Path, name: str) -> tuple[int, int]:
    """(header offset, data offset) of a member."""
    with tarfile.open(tar) as archive:
        info = archive.getmember(name)
        return info.offset, info.offset_data


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_stored_image_is_unreadable_naming_its_tar(scratch, workers):
    tar = scratch / "embed" / "00000.tar"
    _, start = tar_member(tar, "000000004.jpg")
    st = tar.stat()
    with open(tar, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * 64)  # no decoder recognises it any more
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    loader = make_loader(
        LoaderConfig(cache=scratch, condition="perturb", batch_size=N_IMAGES, workers=workers)
    )
    with pytest.raises(Unreadable) as info:
        next(loader)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tar} (the image of key '000000004')")
    assert f"pipeline run --cache {scratch} --verify" in message


def test_a_damaged_tar_header_is_unreadable_not_fewer_images(scratch):
    shutil.rmtree(scratch / "_trainers", ignore_errors=True)  # the deriving loader indexes the tars
    tar = scratch / "embed" / "00001.tar"
    header, _ = tar_member(tar, "000000030.jpg")
    st = tar.stat()
    with open(tar, "r+b") as f:
        f.seek(header + 3)
        f.write(b"X")  # one byte of the member name: its key no longer matches the sidecar
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Unreadable, match="00001.tar: cannot be decoded .*'000000030'.*--verify"):
        make_loader(LoaderConfig(cache=scratch, condition="perturb"))


@pytest.mark.parametrize("damage", ["replaced", "flipped"])
def test_damaged_caption_features_are_recomputed_with_a_warning(scratch, damage):
    shutil.rmtree(scratch / "_trainers", ignore_errors=True)
    first = make_loader(LoaderConfig(cache=scratch, condition="caption", batch_size=4)).info.caption_features
    if damage == "replaced":
        Path(first).write_bytes(b"not an array")  # a damaged derived file
    else:
        flip_middle(Path(first), 64)  # still an array of the right shape
    for stored in (scratch / "_trainers").glob("samples-*"):
        shutil.rmtree(stored)  # a stored sample set holds the features already: it must be derived again
    with pytest.warns(UserWarning, match="caption_features-.*cannot be read.*recomputing it"):
        again = make_loader(LoaderConfig(cache=scratch, condition="caption", batch_size=4))
    assert np.load(again.info.caption_features).shape == (N_IMAGES, D)


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.md5(path.read_bytes()).hexdigest(),
            )
    return out


def test_loader_is_read_only_outside_trainers_dir(scratch):
    shutil.rmtree(scratch / "_trainers", ignore_errors=True)  # earlier tests may have made it
    before = snapshot(scratch)
    for condition in ("optimize", "retrieve", "perturb", "caption"):
        loader = make_loader(
            LoaderConfig(cache=scratch, condition=condition, batch_size=8, paired_fraction=0.0)
        )
        next(loader)
    loader = make_loader(LoaderConfig(cache=scratch, condition="optimize", batch_size=8, paired_fraction=0.5))
    next(loader)
    after = snapshot(scratch)
    assert {k: v for k, v in after.items() if k in before} == before  # bytes and mtimes unchanged
    added = sorted(set(after) - set(before))
    assert added and all(k.startswith("_trainers/") for k in added), added
    # one shared caption-feature file for every run on these embed outputs and this CLIP, and one stored
    # sample set per condition (trainers/data/sample_store.py)
    assert len([k for k in added if k.startswith("_trainers/caption_features-")]) == 1
    stored = {Path(k).parent.name for k in added if k.startswith("_trainers/samples-")}
    assert len(stored) == 5


def test_caption_features_are_computed_once_and_shared(scratch, monkeypatch):
    make_loader(LoaderConfig(cache=scratch, condition="caption", batch_size=4))
    recomputed = lambda *a, **k: pytest.fail("caption features recomputed")  # noqa: E731
    monkeypatch.setattr(conditions, "load_cache_clip", recomputed)
    loader = make_loader(LoaderConfig(cache=scratch, condition="caption", batch_size=4, seed=5))
    assert loader.info.caption_features and Path(loader.info.caption_features).is_file()


def test_config_errors_name_the_flag(cache):
    cache_dir, _ = cache
    for kwargs, flag in (
        ({"condition": "clip"}, "--condition"),
        ({"paired_fraction": 1.5}, "--paired-fraction"),
        ({"batch_size": 0}, "--batch-size"),
        ({"tau_r": 0.0}, "--tau-r"),
        ({"condition": "caption", "paired_fraction": 0.5}, "--paired-fraction"),
    ):
        with pytest.raises(ConfigError, match=flag):
            make_loader(LoaderConfig(cache=cache_dir, **kwargs))


def test_cache_clip_and_feature_dim(cache):
    cache_dir, _ = cache
    clip = cache_clip(cache_dir)
    assert (clip.clip_model, clip.clip_pretrained, feature_dim(cache_dir)) == (TINY_CLIP, "", D)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_index_agrees_with_tarfile(tmp_path, fmt):
    path = tmp_path / "shard.tar"
    long_dir = "d" * 90 + "/" + "e" * 60  # needs the USTAR prefix field, or a pax / GNU long name
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, payload in (("a/k1.jpg", b"x" * 700), (f"{long_dir}/k2.png", b"y" * 3), ("k3.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    fd = os.open(path, os.O_RDONLY)
    try:
        index = index_tar(fd)
        assert index == _index_tar_slow(fd)
        assert set(index) == {"a/k1", f"{long_dir}/k2"}
        offset, size, ext = index[f"{long_dir}/k2"]
        assert os.pread(fd, size, offset) == b"yyy" and ext == "png"
    finally:
        os.close(fd)


def test_images_without_a_caption_are_left_out_of_caption_and_never_paired(image_folder, tmp_path):
    cache = tmp_path / "cache"
    config = EmbedConfig(
        inputs=(str(image_folder),),
        cache=cache,
        clip_model=TINY_CLIP,
        clip_pretrained="",
        image_size=32,
        workers=0,
    )
    run_embed(config)  # six images, only a/img0 has a caption
    loader = make_loader(LoaderConfig(cache=cache, condition="caption", batch_size=2))
    assert loader.info.n_images == 1 and loader.info.excluded == {"no_caption": 5}
    assert next(loader)["key"] == ["a/img0", "a/img0"]
    mixed = make_loader(LoaderConfig(cache=cache, condition="perturb", batch_size=6, paired_fraction=1.0))
    assert mixed.info.n_images == 6 and mixed.info.paired_pool == 1
    batch = next(mixed)
    assert [k for k, p in zip(batch["key"], batch["paired"], strict=True) if p] == ["a/img0"]


# --- the stored sample set (trainers/data/sample_store.py): derived once, then memory-mapped by every loader,
# with the same batches; derived again when what it was made from changes; never from a partial cache.


@pytest.fixture
def fresh(cache, tmp_path) -> Path:
    """A private copy of the cache without derived files."""
    copy = Path(shutil.copytree(cache[0], tmp_path / "cache"))
    shutil.rmtree(copy / "_trainers", ignore_errors=True)
    return copy


def batches(loader, n: int = 3) -> list[dict]:
    return [next(loader) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert (
            x["key"] == y["key"] and torch.equal(x["cond"], y["cond"]) and torch.equal(x["image"], y["image"])
        )


@pytest.mark.parametrize("condition", ["optimize", "retrieve", "perturb", "caption"])
def test_a_second_loader_reads_the_stored_set_and_sees_the_same_batches(fresh, monkeypatch, condition):
    config = LoaderConfig(cache=fresh, condition=condition, batch_size=7, seed=3)
    first = make_loader(config)
    derived = batches(first)
    (stored,) = (fresh / "_trainers").glob("samples-*")
    assert (stored / "info.json").is_file() and isinstance(first.dataset.rows, StoredRows)
    monkeypatch.setattr(data, "read_dataset", lambda c: pytest.fail("the cache was read again"))
    again = make_loader(config, start_step=0)
    assert isinstance(again.dataset.cond, RowFile) and isinstance(again.dataset.rows_idx, AllRows)
    assert again.info == first.info
    same(derived, batches(again))
    later = make_loader(config, start_step=2)
    same(derived[2:], batches(later, 1))  # resumes by arithmetic on the stored set too


def test_a_changed_stage_output_derives_a_new_set(fresh):
    make_loader(LoaderConfig(cache=fresh, condition="optimize", batch_size=4))
    manifest = fresh / "optimize" / "_manifests" / "00001.json"
    record = json.loads(manifest.read_text())
    record["key"] = "0" * 32  # the stage remade shard 1 (other inputs or params)
    manifest.write_text(json.dumps(record))
    make_loader(LoaderConfig(cache=fresh, condition="optimize", batch_size=4))
    assert len(list((fresh / "_trainers").glob("samples-*"))) == 2


def test_a_damaged_store_is_rebuilt_with_a_warning(fresh):
    config = LoaderConfig(cache=fresh, condition="perturb", batch_size=5)
    before = batches(make_loader(config))
    (stored,) = (fresh / "_trainers").glob("samples-*")
    (stored / "cond.npy").write_bytes(b"not an array")
    with pytest.warns(UserWarning, match="samples-.*cannot be read.*rebuilding it"):
        loader = make_loader(config)
    same(before, batches(loader))


@pytest.mark.parametrize("name", ["cond.npy", "where.npy", "keys.npy", "info.json"])
def test_same_size_damage_to_a_store_is_rebuilt_with_one_warning_naming_the_file(fresh, name):
    config = LoaderConfig(cache=fresh, condition="optimize", batch_size=5)
    before = batches(make_loader(config))
    (stored,) = (fresh / "_trainers").glob("samples-*")
    if name == "info.json":  # still valid JSON, of the same size
        text = (stored / name).read_text()
        (stored / name).write_text(text.replace('"probability": 0', '"probability": 1', 1))
        assert (stored / name).read_text() != text
    else:
        flip_middle(stored / name, 64)  # size and mtime as they were
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = make_loader(config)
    (message,) = [str(w.message) for w in caught if w.category is UserWarning]
    assert message.startswith(f"{stored}: cannot be read ({name} is damaged")
    assert message.endswith("rebuilding it")
    same(before, batches(loader))
    assert [p.name for p in (fresh / "_trainers").glob("samples-*")] == [stored.name]
    cond = np.asarray(loader.dataset.cond[np.arange(len(loader.dataset.cond))], np.float32)
    assert np.allclose(np.linalg.norm(cond, axis=1), 1, atol=1e-2)  # the rebuilt rows, not the damage


def test_a_copied_store_is_hashed_once_then_trusted(fresh, monkeypatch):
    config = LoaderConfig(cache=fresh, condition="optimize", batch_size=5)
    before = batches(make_loader(config))
    (stored,) = (fresh / "_trainers").glob("samples-*")
    copy = stored.with_name(stored.name + ".copy")
    shutil.copytree(stored, copy)  # new inodes and ctimes, same bytes (as a copied cache has)
    shutil.rmtree(stored)
    copy.rename(stored)
    hashed = []
    real = store_files.digest_file_content
    monkeypatch.setattr(store_files, "digest_file_content", lambda p: hashed.append(p.name) or real(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        same(before, batches(make_loader(config)))
        assert sorted(hashed) == ["cond.npy", "keys.npy", "pool.npy", "where.npy"]
        same(before, batches(make_loader(config)))
    assert len(hashed) == 4  # its stamps were renewed: the second loader read nothing whole


def test_a_partial_cache_is_never_stored(fresh):
    with open(fresh / "optimize" / "00001.parquet", "ab") as f:
        f.write(b"being rewritten")
    with pytest.warns(UserWarning, match="leaving out optimize shards"):
        loader = make_loader(partial(fresh, "optimize", batch_size=4))
    assert loader.info.skipped_shards and not list((fresh / "_trainers").glob("samples-*"))
    assert loader.info.n_images < N_IMAGES
