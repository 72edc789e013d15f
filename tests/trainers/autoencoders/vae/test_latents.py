"""`trainers vae --encode`: latents committed with manifests, reruns that do nothing, an appended embed
shard encoded alone, cached latents giving the same LDM step as encoding on the fly, and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from factories import TINY_CLIP
from typer.testing import CliRunner

from cli.trainers import app
from manifests import list_manifests
from trainers.autoencoders.vae.config import VaeConfig
from trainers.autoencoders.vae.encode import (
    KIND,
    encode_latents,
    latents_stage,
    load_latent_cache,
    posterior_means,
    vae_digest,
)
from trainers.autoencoders.vae.model import load_vae
from trainers.autoencoders.vae.train import run_vae
from trainers.data import derived_store
from trainers.data.derived import read_derived
from trainers.data.loader import LoaderConfig, make_loader
from trainers.families.ldm.config import LdmConfig
from trainers.families.ldm.model import ldm_architecture
from trainers.families.ldm.train import LdmTrainer

runner = CliRunner()


def _pipeline(*args):
    from cli.pipeline import app as pipeline_app

    result = runner.invoke(pipeline_app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _embed(root, pattern):
    _pipeline(
        "embed", f"{root / 'w'}/{pattern}", "--cache", root / "c", "--clip-model", TINY_CLIP,
        "--clip-pretrained", "", "--image-size", 32, "--workers", 0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, cache, vae checkpoint): 3 synthetic tars of 8 images, the first two embedded, a tiny VAE."""
    root = tmp_path_factory.mktemp("latents-world")
    _pipeline(
        "synth", "--out", root / "w", "--n", 24, "--shard-size", 8, "--n-captions", 40, "--image-size", 32
    )
    _embed(root, "0000[01].tar")
    vae = run_vae(
        VaeConfig(
            cache=root / "c", out=root / "runs", size="tiny", steps=1, batch_size=4, eval_n=2, device="cpu"
        )
    )
    return root, root / "c", vae.checkpoint


def test_encode_writes_manifests_reruns_nothing_and_encodes_an_appended_shard_alone(world):
    root, cache, ckpt = world
    digest = vae_digest(ckpt)
    stage = latents_stage(digest)
    assert stage == f"latents/{digest[:12]}"

    first = encode_latents(cache, ckpt, batch_size=3, device="cpu")
    assert first.stage == stage and first.shards_run == [0, 1] and first.latents_written == 16
    assert first.latent_shape == (4, 8, 8)
    manifests = list_manifests(cache, stage)
    assert sorted(manifests) == [0, 1]
    embed = list_manifests(cache, "embed")
    for shard, manifest in manifests.items():
        assert manifest["params"]["vae_digest"] == digest and manifest["latent_shape"] == [4, 8, 8]
        want = sorted(o["digest"] for o in embed[shard]["outs"] if o["path"].endswith((".parquet", ".tar")))
        assert sorted(d["digest"] for d in manifest["deps"]) == want
        table = pq.read_table(cache / stage / f"{shard:05d}.parquet")
        assert table.schema.field("latent").type.list_size == 256 and table.num_rows == 8
        assert json.loads(table.schema.metadata[b"latent_shape"]) == [4, 8, 8]

    # the stored latents are the eval-mode posterior means
    vae, _ = load_vae(ckpt)
    loader = make_loader(LoaderConfig(cache=cache, condition="perturb", batch_size=4))
    batch = next(loader)
    lat = load_latent_cache(cache, ckpt)
    found, cached = lat.lookup(batch["key"])
    assert found.all() and len(lat) == 16
    with torch.no_grad():
        mean, _ = vae.encode(batch["image"].float())
    torch.testing.assert_close(torch.from_numpy(cached), mean, rtol=0, atol=1e-6)

    mtimes = {p: p.stat().st_mtime_ns for p in (cache / stage).rglob("*") if p.is_file()}
    again = encode_latents(cache, ckpt, batch_size=5, device="cpu")  # batch size is not keyed
    assert again.shards_run == [] and again.shards_up_to_date == [0, 1]
    assert mtimes == {p: p.stat().st_mtime_ns for p in (cache / stage).rglob("*") if p.is_file()}

    _embed(root, "*.tar")  # a third embed shard appears
    appended = encode_latents(cache, ckpt, batch_size=8, device="cpu")
    assert appended.shards_run == [2] and appended.shards_up_to_date == [0, 1]
    assert appended.reasons == {2: "new shard"} and appended.latents_written == 8
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}  # shards 0 and 1 untouched
    assert len(load_latent_cache(cache, ckpt)) == 24

    # a removed output makes that shard stale; it alone is remade
    (cache / stage / "00001.parquet").unlink()
    assert len(load_latent_cache(cache, ckpt)) == 16  # its rows fall back to on-the-fly encoding
    redo = encode_latents(cache, ckpt, device="cpu")
    assert redo.shards_run == [1] and "output missing" in redo.reasons[1]


def test_cached_latents_give_the_same_ldm_step_as_encoding_on_the_fly(world, tmp_path):
    _, cache, ckpt = world
    encode_latents(cache, ckpt, device="cpu")
    lat = load_latent_cache(cache, ckpt)
    assert lat is not None
    vae, _ = load_vae(ckpt)
    batch = next(make_loader(LoaderConfig(cache=cache, condition="perturb", batch_size=4, seed=3)))
    arch = ldm_architecture("tiny", 4, 8, 64, 1.7)
    config = LdmConfig(cache=cache, vae=ckpt, size="tiny", batch_size=4, device="cpu")

    def step(latent_cache, **kw):
        torch.manual_seed(11)
        trainer = LdmTrainer(config, arch, vae, torch.device("cpu"))
        trainer.latent_cache = latent_cache
        if latent_cache is not None and kw.get("no_encoder"):
            trainer.vae = _NoEncode(vae)  # the cached path must not run the encoder
        torch.manual_seed(12)
        losses = [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
        return losses, trainer.model.state_dict()

    fly, fly_state = step(None)
    cached, cached_state = step(lat, no_encoder=True)
    assert cached == pytest.approx(fly, rel=1e-6, abs=1e-7)
    for name, tensor in fly_state.items():
        torch.testing.assert_close(cached_state[name], tensor, rtol=1e-5, atol=1e-6)

    # partly cached (one key unknown): the rest is encoded on the fly, same numbers
    keys = ["missing"] + batch["key"][1:]
    mixed = posterior_means(vae, batch["image"], keys, lat)
    with torch.no_grad():
        mean, _ = vae.encode(batch["image"].float())
    torch.testing.assert_close(mixed, mean, rtol=0, atol=1e-5)  # conv sums differ by batch size (~1e-6)


class _NoEncode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.inner = vae

    def encode(self, x):
        raise AssertionError("the encoder ran although every latent was cached")


def test_ldm_run_records_the_cached_latents(world, tmp_path):
    from trainers.families.ldm.train import run_ldm

    _, cache, ckpt = world
    encode_latents(cache, ckpt, device="cpu")
    config = LdmConfig(
        cache=cache, vae=ckpt, out=tmp_path, size="tiny", condition="perturb", steps=1, batch_size=4,
        device="cpu", checkpoint_every=0, sample_every=0, sample_steps=1, samples_per_prompt=1,
    )  # fmt: skip
    result = run_ldm(config)
    recorded = json.loads((result.run_dir / "config.json").read_text())["latents"]
    assert recorded == {"stage": latents_stage(vae_digest(ckpt)), "cached": 24}
    assert torch.isfinite(torch.tensor(result.losses["loss"]))


def test_cli_encode_and_one_line_errors(world, tmp_path):
    _, cache, ckpt = world
    # 16 images: too few for the probe to judge the VAE (refusals:
    # tests/trainers/autoencoders/test_recon_probe.py)
    encode = ["vae", "--cache", str(cache), "--encode", str(ckpt), "--device", "cpu"]
    result = runner.invoke(app, encode)
    assert result.exit_code == 0, result.output
    assert "vae --encode:" in result.output and latents_stage(vae_digest(ckpt)) in result.output
    assert (cache / latents_stage(vae_digest(ckpt)) / "_manifests" / "00000.json").is_file()

    def user_error(args, message):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        lines = [x for x in result.output.splitlines() if x.strip() and not x.startswith("warning")]
        assert len(lines) == 1 and message in lines[0], result.output

    user_error(["vae", "--cache", cache, "--encode", tmp_path / "none.pt"], "--encode")
    user_error(["vae", "--encode", ckpt], "--cache is required")
    user_error(["vae", "--cache", cache, "--encode", ckpt, "--batch-size", 0], "--batch-size")
    user_error(["vae", "--cache", tmp_path / "nope", "--encode", ckpt], "no such directory")
    assert "--encode" in runner.invoke(app, ["vae", "--help"]).output


def test_a_damaged_latents_shard_is_encoded_on_the_fly_and_remade(world):
    _, cache, ckpt = world
    encode_latents(cache, ckpt, device="cpu")
    before = len(load_latent_cache(cache, ckpt))
    path = cache / latents_stage(vae_digest(ckpt)) / "00000.parquet"
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # bit rot: one byte of a latent, size and mtime unchanged
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(UserWarning, match="00000.parquet: damaged latents, .* encoded on the fly; removed"):
        lat = load_latent_cache(cache, ckpt)
    assert len(lat) == before - 8 and not path.exists()  # shard 0's 8 images fall back to the encoder
    redo = encode_latents(cache, ckpt, device="cpu")
    assert redo.shards_run == [0] and "output missing" in redo.reasons[0]
    assert len(load_latent_cache(cache, ckpt)) == before


def test_ldm_reads_the_stored_latents_bit_for_bit_and_derives_them_once(world, monkeypatch):
    """`load_latent_cache` reads a store of the cache state (trainers/data/derived_store.py) made once: every
    key's latent is the in-memory read's, float32; a second load opens it without reading the shards."""
    _, cache, ckpt = world
    encode_latents(cache, ckpt, device="cpu")
    lat = load_latent_cache(cache, ckpt)
    memory = read_derived(KIND, cache, ckpt)
    assert isinstance(lat.rows, derived_store.StoredRows) and len(lat) == len(memory) == 24
    found, stored = lat.lookup(memory.keys)
    assert found.all() and stored.dtype == np.float32 and stored.tobytes() == memory.values.tobytes()
    assert lat.latents.shape == (24, 4, 8, 8) and lat.latents.dtype == np.float32
    assert not lat.lookup(["missing", memory.keys[0] + "-"])[0].any()
    monkeypatch.setattr(derived_store, "derive_store", lambda *a: pytest.fail("derived again"))
    again = load_latent_cache(cache, ckpt)
    assert again.lookup(memory.keys[:5])[1].tobytes() == memory.values[:5].tobytes()
