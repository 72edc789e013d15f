"""`trainers dvae --encode`: token shards committed with manifests and their schema, reruns that do
nothing, an appended embed shard encoded alone, cached tokens equal to tokens computed on the fly (and
decoded the same), a damaged shard remade, and tokens of another dVAE refused with one line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import typer
from factories import TINY_CLIP
from typer.testing import CliRunner

from cli.common import user_errors
from core.errors import ConfigError
from feature_cache.embed_rows import read_embed
from manifests import list_manifests
from trainers.autoencoders.dvae.config import DvaeConfig
from trainers.autoencoders.dvae.encode import (
    KIND,
    dvae_digest,
    encode_tokens,
    image_tokens,
    load_token_cache,
    require_token_cache,
    tokens_for,
    tokens_stage,
)
from trainers.autoencoders.dvae.model import decode_tokens, load_dvae
from trainers.autoencoders.dvae.train import run_dvae
from trainers.data import derived_store
from trainers.data.derived import read_derived

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


def _dvae(cache, out, seed):
    config = DvaeConfig(
        cache=cache, out=out, size="tiny", steps=30, batch_size=8, lr=3e-3, eval_n=2, anneal_steps=20,
        seed=seed, checkpoint_every=0, device="cpu",
    )  # fmt: skip
    return run_dvae(config).checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    """(root, cache, dvae checkpoint): 3 synthetic tars of 8 images, the first two embedded, a tiny dVAE
    trained 30 steps (so its codes differ between images)."""
    root = tmp_path_factory.mktemp("tokens-world")
    _pipeline(
        "synth", "--out", root / "w", "--n", 24, "--shard-size", 8, "--n-captions", 40, "--image-size", 32
    )
    _embed(root, "0000[01].tar")
    return root, root / "c", _dvae(root / "c", root / "runs", seed=0)


def test_encode_writes_manifests_reruns_nothing_and_encodes_an_appended_shard_alone(world):
    root, cache, ckpt = world
    digest = dvae_digest(ckpt)
    stage = tokens_stage(digest)
    assert stage == f"tokens/{digest[:12]}"

    first = encode_tokens(cache, ckpt, batch_size=3, device="cpu")
    assert first.stage == stage and first.shards_run == [0, 1] and first.images_written == 16
    assert first.grid == (8, 8) and first.vocab_size == 64
    manifests = list_manifests(cache, stage)
    embed = list_manifests(cache, "embed")
    assert sorted(manifests) == [0, 1]
    for shard, manifest in manifests.items():
        assert manifest["params"]["dvae_digest"] == digest and manifest["grid"] == [8, 8]
        assert manifest["vocab_size"] == 64 and manifest["dvae_id"] == digest[:12] and manifest["rows"] == 8
        want = sorted(o["digest"] for o in embed[shard]["outs"] if o["path"].endswith((".parquet", ".tar")))
        assert sorted(d["digest"] for d in manifest["deps"]) == want
        table = pq.read_table(cache / stage / f"{shard:05d}.parquet")
        tokens = table.schema.field("tokens").type
        assert tokens.list_size == 64 and str(tokens.value_type) == "int16" and table.num_rows == 8
        meta = table.schema.metadata
        assert json.loads(meta[b"grid"]) == [8, 8] and meta[b"vocab_size"] == b"64"

    mtimes = {p: p.stat().st_mtime_ns for p in (cache / stage).rglob("*") if p.is_file()}
    again = encode_tokens(cache, ckpt, batch_size=5, device="cpu")  # batch size is not keyed
    assert again.shards_run == [] and again.shards_up_to_date == [0, 1]
    assert mtimes == {p: p.stat().st_mtime_ns for p in (cache / stage).rglob("*") if p.is_file()}

    _embed(root, "*.tar")  # a third embed shard appears
    appended = encode_tokens(cache, ckpt, batch_size=8, device="cpu")
    assert appended.shards_run == [2] and appended.reasons == {2: "new shard"}
    assert appended.images_written == 8 and mtimes == {p: p.stat().st_mtime_ns for p in mtimes}
    assert len(load_token_cache(cache, ckpt)) == 24

    (cache / stage / "00001.parquet").unlink()  # a removed output: that shard alone is remade
    assert len(load_token_cache(cache, ckpt)) == 16
    redo = encode_tokens(cache, ckpt, device="cpu")
    assert redo.shards_run == [1] and "output missing" in redo.reasons[1]


def test_cached_tokens_equal_tokens_computed_on_the_fly(world):
    _, cache, ckpt = world
    encode_tokens(cache, ckpt, device="cpu")
    cached = load_token_cache(cache, ckpt.parent)  # a run directory: its latest checkpoint
    assert cached.grid == (8, 8) and cached.vocab_size == 64 and cached.dvae_digest == dvae_digest(ckpt)
    assert cached.tokens.shape == (len(cached), 64) and cached.tokens.dtype.name == "int16"
    assert cached.keys[cached.index[cached.keys[5]]] == cached.keys[5]
    model, _ = load_dvae(ckpt)
    rows = read_embed(cache)
    try:
        pixels = rows.pixels(range(len(rows)))  # uint8 [N, 3, 32, 32]
        keys = list(rows.keys)
    finally:
        rows.images.close()
    fly = image_tokens(model, pixels)  # [N, 64] int64
    found, stored = cached.lookup(keys)
    assert found.all() and torch.equal(torch.from_numpy(stored).long(), fly)
    assert len(torch.unique(fly)) > 1  # a trained dVAE: not one code everywhere
    torch.testing.assert_close(image_tokens(model, pixels.float() / 127.5 - 1), fly, rtol=0, atol=0)

    # looked up where cached, encoded where not: the same tokens either way
    mixed = tokens_for(model, pixels[:6], ["missing"] + keys[1:6], cached)
    assert mixed.dtype == torch.long and torch.equal(mixed, fly[:6])
    assert torch.equal(tokens_for(model, pixels[:4], keys[:4], cached), fly[:4])
    assert torch.equal(decode_tokens(model, torch.from_numpy(stored[:4])), decode_tokens(model, fly[:4]))


def test_tokens_of_another_dvae_are_not_used_and_are_refused_in_one_line(world, tmp_path):
    _, cache, ckpt = world
    encode_tokens(cache, ckpt, device="cpu")
    other = _dvae(cache, tmp_path, seed=1)
    assert load_token_cache(cache, other) is None
    with pytest.raises(ConfigError, match=r"were made by another dVAE, none by this one"):
        require_token_cache(cache, other)
    assert len(require_token_cache(cache, ckpt)) == 24

    # a folder copied under the other dVAE's id: its manifests name the first dVAE, so it is not read
    ours, theirs = cache / tokens_stage(dvae_digest(ckpt)), cache / tokens_stage(dvae_digest(other))
    shutil.copytree(ours, theirs)
    assert load_token_cache(cache, other) is None
    shutil.rmtree(theirs)

    cli = typer.Typer()
    cli.command()(user_errors(lambda: require_token_cache(cache, other)))
    result = runner.invoke(cli, [])
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "another dVAE" in lines[0], result.output
    assert f"trainers dvae --cache {cache} --encode" in lines[0]

    empty = tmp_path / "empty"
    (empty / "embed").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no tokens of this dVAE"):
        require_token_cache(empty, ckpt)
    with pytest.raises(ConfigError, match="--dvae .*none.pt: no such checkpoint"):
        require_token_cache(cache, tmp_path / "none.pt")


def test_a_damaged_tokens_shard_is_encoded_on_the_fly_and_remade(world):
    _, cache, ckpt = world
    encode_tokens(cache, ckpt, device="cpu")
    before = len(load_token_cache(cache, ckpt))
    path = cache / tokens_stage(dvae_digest(ckpt)) / "00000.parquet"
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # bit rot: size and mtime unchanged
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(
        UserWarning, match=r"00000.parquet: damaged tokens, .* on the fly; removed; `trainers dvae"
    ):
        cached = load_token_cache(cache, ckpt)
    assert len(cached) == before - 8 and not path.exists()
    redo = encode_tokens(cache, ckpt, device="cpu")
    assert redo.shards_run == [0] and "output missing" in redo.reasons[0]
    assert len(load_token_cache(cache, ckpt)) == before


def test_dalle_reads_the_stored_tokens_bit_for_bit_and_derives_them_once(world, monkeypatch):
    """`load_token_cache` reads a store of the cache state (trainers/data/derived_store.py) made once: every
    key's tokens are the in-memory read's, int16 [h*w]; a second load opens it without reading shards."""
    _, cache, ckpt = world
    encode_tokens(cache, ckpt, device="cpu")
    cached = load_token_cache(cache, ckpt)
    memory = read_derived(KIND, cache, ckpt)
    assert isinstance(cached.rows, derived_store.StoredRows) and len(cached) == len(memory) == 24
    found, stored = cached.lookup(memory.keys)
    assert found.all() and stored.dtype == np.int16 and stored.shape == (24, 64)
    assert stored.tobytes() == memory.values.tobytes()
    assert not cached.lookup(["missing"])[0].any()
    monkeypatch.setattr(derived_store, "derive_store", lambda *a: pytest.fail("derived again"))
    again = load_token_cache(cache, ckpt)
    assert again.grid == (8, 8) and again.vocab_size == 64
    assert again.lookup(memory.keys[:5])[1].tobytes() == memory.values[:5].tobytes()
