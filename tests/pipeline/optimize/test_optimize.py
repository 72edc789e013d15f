"""`pipeline optimize`: the three methods, what optimisation buys over retrieval, determinism, keyed
params, bad inputs and the CLI.

Fixtures are written directly (embed sidecars, caption shards, retrieve shards and their manifests) by
`feature_cache.writer.CacheWriter`, so these tests do not depend on the embed or retrieve code. The
structured world: image features f = normalize(c_g + noise) around 12 object classes g, caption features
t = normalize(c_g + noise + gap) (the same classes, offset along one "modality gap" direction), captions
templated from the class's attributes, and the top-k captions of each image by exact search.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.pipeline import app
from core.errors import ConfigError
from feature_cache.writer import CacheWriter
from manifests import list_manifests
from methods.common import Hyper, Neighbours, in_batch_top1, nearest_rows, split_batches
from methods.perturb import perturb
from methods.run import pseudo_txt_features
from pipeline.optimize.config import OptimizeConfig
from pipeline.optimize.stage import plan_optimize, run_optimize
from world.grammar import make_caption

D = 32
K = 8
OBJECTS = [
    {"shape": s, "colour": c, "size": z, "position": p}
    for s, c, z, p in [
        ("circle", "red", "small", "left"),
        ("square", "blue", "large", "right"),
        ("star", "green", "small", "top"),
        ("cross", "orange", "large", "bottom"),
        ("diamond", "purple", "small", "centre"),
        ("triangle", "yellow", "large", "left"),
        ("circle", "green", "large", "top"),
        ("square", "red", "small", "bottom"),
        ("star", "orange", "large", "centre"),
        ("cross", "blue", "small", "right"),
        ("diamond", "yellow", "large", "top"),
        ("triangle", "purple", "small", "bottom"),
    ]
]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def structured_world(
    cache, *, shards=(96, 80), n_captions=480, noise=1.0, gap=1.0, seed=0, labels=True
) -> dict:
    """Embed shards of `shards` images, two caption shards and exact top-K retrieve shards."""
    rng = np.random.default_rng(seed)
    factory = CacheWriter(cache, D)
    centres = _unit(rng.standard_normal((len(OBJECTS), D)))
    gap_dir = _unit(rng.standard_normal(D))
    classes = np.arange(n_captions) % len(OBJECTS)
    txt = _unit(centres[classes] + noise * _unit(rng.standard_normal((n_captions, D))) + gap * gap_dir)
    ids = 1000 + 7 * rng.permutation(n_captions)  # sparse, unordered ids: the bank must sort them
    texts = [make_caption([OBJECTS[g]], random.Random(j)) for j, g in enumerate(classes)]
    half = n_captions // 2
    factory.captions(0, ids[:half], texts[:half], txt[:half])
    factory.captions(1, ids[half:], texts[half:], txt[half:])
    txt16 = txt.astype(np.float16).astype(np.float32)
    world = {"factory": factory, "keys": [], "img": []}
    for shard, n in enumerate(shards):
        g = rng.integers(len(OBJECTS), size=n)
        img = _unit(centres[g] + noise * _unit(rng.standard_normal((n, D))))
        keys = [f"s{shard}/{i:04d}" for i in range(n)]
        lab = [json.dumps({"objects": [OBJECTS[c]]}) for c in g] if labels else None
        factory.embed(shard, keys, img, lab)
        sims = img.astype(np.float16).astype(np.float32) @ txt16.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :K]
        factory.retrieve(shard, keys, ids[top], np.take_along_axis(sims, top, axis=1))
        world["keys"].append(keys)
        world["img"].append(img)
    return world


def _config(cache, **kw) -> OptimizeConfig:
    kw.setdefault("device", "cpu")
    kw.setdefault("batch_size", 64)
    return OptimizeConfig(cache=cache, **kw)


def _read(cache, shard=0):
    return pq.read_table(cache / "optimize" / f"{shard:05d}.parquet")


def _stats(cache, shard=0):
    return json.loads((cache / "optimize" / "_stats" / f"{shard:05d}.json").read_text())


def _pseudo(table) -> np.ndarray:
    return np.stack(table.column("pseudo_txt").to_numpy(zero_copy_only=False)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# The methods, end to end
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["optimize", "retrieve", "perturb"])
def test_each_method_writes_unit_norm_features_in_embed_order(tmp_path, method):
    cache = tmp_path / "cache"
    world = structured_world(cache)
    result = run_optimize(_config(cache, method=method))
    assert result.shards_run == [0, 1] and result.rows_written == 176 and result.dropped == {}
    for shard, keys in enumerate(world["keys"]):
        table = _read(cache, shard)
        assert table.schema.field("pseudo_txt").type == pa.list_(pa.float16(), D)
        assert table.schema.field("cos_init").type == pa.float32() == table.schema.field("cos_final").type
        assert table.column("key").to_pylist() == keys
        assert set(table.column("method").to_pylist()) == {method}
        h = _pseudo(table)
        assert h.shape == (len(keys), D) and np.isfinite(h).all()
        np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1.0, atol=2e-3)
        cos = (_unit(world["img"][shard]).astype(np.float16).astype(np.float32) * h).sum(1)
        np.testing.assert_allclose(table.column("cos_final").to_numpy(), cos, atol=3e-3)
    cos_init = _read(cache).column("cos_init").to_numpy()
    cos_final = _read(cache).column("cos_final").to_numpy()
    if method == "perturb":
        np.testing.assert_allclose(cos_init, 1.0, atol=1e-5)  # its starting point is the image itself
        # xi = 3: h = normalize(f + 3u) for a random unit u, so cos(f, h) ~ 1 / sqrt(10) in high dimension
        assert 0.1 < cos_final.mean() < 0.5
    elif method == "retrieve":
        np.testing.assert_allclose(cos_init, cos_final, atol=2e-3)
    else:
        assert np.abs(cos_final - cos_init).mean() > 1e-2  # refined away from h0
    manifest = list_manifests(cache, "optimize")[0]
    assert manifest["stage"] == "optimize" and manifest["params"]["method"] == method
    dep_names = [d["name"] for d in manifest["deps"]]
    if method == "perturb":
        assert dep_names == ["embed/00000.parquet"]
    else:
        assert dep_names == [
            "embed/00000.parquet",
            "retrieve/00000.parquet",
            "captions/00000.parquet",
            "captions/00001.parquet",
        ]


def test_optimize_lowers_the_loss_and_raises_in_batch_top1_over_retrieve(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache, shards=(160,))
    run_optimize(_config(cache, method="retrieve"))
    base = _stats(cache)
    assert base["loss_final"] == base["loss_init"] and base["top1_final"] == base["top1_init"]
    for param, min_gain in (("weights", 0.1), ("residual", 0.3)):
        run_optimize(_config(cache, method="optimize", param=param))
        stats = _stats(cache)
        # the starting point is exactly the retrieve result, on the same batches
        assert stats["loss_init"] == pytest.approx(base["loss_final"], abs=1e-5)
        assert stats["top1_init"] == pytest.approx(base["top1_final"])
        assert stats["loss_final"] < base["loss_final"] - 0.1, (param, stats)
        assert stats["top1_final"] >= base["top1_final"] + min_gain, (param, stats)
        assert stats["steps"] == 20 and stats["batches"] == 3 and stats["batch_size"] == 54
        assert stats["proximity_final"] > 0


def test_bf16_loss_inputs_still_refine_and_record_their_dtype(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache, shards=(100,))
    run_optimize(_config(cache, precision="fp32"))
    fp32 = _stats(cache)
    run_optimize(_config(cache, precision="bf16", force=True))
    bf16 = _stats(cache)
    assert (fp32["loss_dtype"], bf16["loss_dtype"]) == ("float32", "bfloat16")
    assert bf16["top1_final"] > bf16["top1_init"] + 0.05 and bf16["loss_final"] < bf16["loss_init"] - 0.1
    assert bf16["top1_final"] == pytest.approx(fp32["top1_final"], abs=0.05)
    h = _pseudo(_read(cache))
    assert np.isfinite(h).all() and np.allclose(np.linalg.norm(h, axis=1), 1.0, atol=2e-3)


def test_stats_record_the_loss_backend_that_ran_and_the_self_check_behind_auto(tmp_path, monkeypatch):
    import kernels.contrastive as contrastive
    import kernels.self_check as self_check

    cache = tmp_path / "cache"
    structured_world(cache, shards=(40,))
    run_optimize(_config(cache, steps=2))
    stats = _stats(cache)
    assert (stats["loss_backend"], stats["self_check"]) == ("torch", None)  # CPU: auto never considers triton

    # As on a GPU whose kernel fails its first-use self-check: auto runs torch, and the stats say why.
    failed = self_check.SelfCheck(False, 0.5, 0.2, False, {}, "triton differs from torch: dH ...")
    monkeypatch.setattr(contrastive, "_triton_supported", lambda device: True)
    monkeypatch.setattr(self_check, "first_use_check", lambda device, dtype, dim: failed)
    run_optimize(_config(cache, steps=2, force=True))
    stats = _stats(cache)
    assert stats["loss_backend"] == "torch" and stats["self_check"] == failed.summary()
    run_optimize(_config(cache, steps=2, backend="torch", force=True))
    assert (_stats(cache)["loss_backend"], _stats(cache)["self_check"]) == ("torch", None)


def test_attribute_precision_of_the_nearest_caption_is_reported_on_the_synthetic_world(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache, shards=(120,), noise=0.6)
    run_optimize(_config(cache, method="retrieve"))
    stats = _stats(cache)
    precision = stats["attr_precision_init"]
    assert precision == stats["attr_precision_final"] and precision["n"] == 120
    # classes are well separated at this noise: the nearest caption names the image's object
    assert precision["mean"] > 0.9 and precision["colour"] > 0.9 and precision["shape"] > 0.9
    run_optimize(_config(cache, method="optimize", param="residual", lr=0.05, proximity=0.0, steps=40))
    after = _stats(cache)["attr_precision_final"]
    assert after["n"] == 120 and 0 <= after["mean"] <= 1
    assert after["mean"] < precision["mean"]  # a huge free step leaves the text side: the metric sees it


def test_attribute_precision_is_absent_without_labels_and_for_perturb(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache, shards=(40,), labels=False)
    run_optimize(_config(cache, method="retrieve"))
    assert _stats(cache)["attr_precision_init"] is None
    cache2 = tmp_path / "cache2"
    structured_world(cache2, shards=(40,))
    run_optimize(_config(cache2, method="perturb"))
    assert _stats(cache2)["attr_precision_final"] is None


def test_results_are_deterministic_for_a_seed(tmp_path):
    digests = {}
    for run in ("a", "b", "c"):
        cache = tmp_path / run
        structured_world(cache, shards=(70,))
        seed = 1 if run == "c" else 0
        for method in ("optimize", "perturb"):
            run_optimize(_config(cache, method=method, seed=seed, batch_size=32))
            digests[run, method] = (cache / "optimize" / "00000.parquet").read_bytes()
    assert digests["a", "optimize"] == digests["b", "optimize"]
    assert digests["a", "perturb"] == digests["b", "perturb"]
    assert digests["a", "perturb"] != digests["c", "perturb"]  # the seed is used
    assert digests["a", "optimize"] != digests["c", "optimize"]  # it shuffles the batches


def test_summary_and_stats_files(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache)
    result = run_optimize(_config(cache))
    s = result.summary
    assert s["shards"] == 2 and s["written"] == 176 and s["methods"] == ["optimize"]
    for name in ("cos_init", "cos_final", "top1_init", "top1_final", "loss_init", "loss_final"):
        per_shard = [_stats(cache, i)[name] for i in (0, 1)]
        assert s[name] == pytest.approx((per_shard[0] * 96 + per_shard[1] * 80) / 176, abs=1e-5)
    assert s["top1_final"] > s["top1_init"] and "attr_precision_final" in s


# ---------------------------------------------------------------------------------------------------------
# Keyed params and incremental reruns
# ---------------------------------------------------------------------------------------------------------


def test_same_params_do_no_work_and_each_keyed_param_reruns_only_this_stage(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache)
    upstream = {s: list_manifests(cache, s) for s in ("embed", "retrieve", "captions")}
    assert run_optimize(_config(cache)).shards_run == [0, 1]
    assert run_optimize(_config(cache)).shards_run == []
    # unkeyed: the device, kernel backend and loss precision change rounding, not the maths
    assert run_optimize(_config(cache, backend="torch", precision="bf16")).shards_run == []
    for change in ({"batch_size": 32}, {"steps": 3}, {"tau": 0.1}, {"param": "residual"}, {"seed": 5}):
        plan = plan_optimize(_config(cache, **change))
        assert [t.spec.shard for t in plan.tasks] == [0, 1]
        assert plan.tasks[0].reason.startswith("params changed"), plan.tasks[0].reason
    plan = plan_optimize(_config(cache, method="retrieve"))
    assert [t.reason for t in plan.tasks] == [
        "params changed: batch_size, lr, method, param, proximity, seed, steps, tau"
    ] * 2
    assert run_optimize(_config(cache, method="retrieve")).shards_run == [0, 1]
    # retrieve does not read --tau, --steps or --seed: changing them is no work
    assert run_optimize(_config(cache, method="retrieve", tau=0.2, steps=3, seed=9)).shards_run == []
    assert run_optimize(_config(cache, method="retrieve", tau_r=1.0)).shards_run == [0, 1]
    # a batch size clamped to the shard: 96 and 80 rows make one batch at B = 100 or B = 65536 alike
    assert run_optimize(_config(cache, batch_size=100)).shards_run == [0, 1]
    assert run_optimize(_config(cache, batch_size=65536)).shards_run == []
    assert run_optimize(_config(cache, batch_size=90)).shards_run == [0]
    assert run_optimize(_config(cache, method="retrieve", tau_r=1.0, force=True)).shards_run == [0, 1]
    assert {s: list_manifests(cache, s) for s in upstream} == upstream  # upstream stages never touched


def test_an_upstream_change_reruns_only_its_shard(tmp_path):
    cache = tmp_path / "cache"
    world = structured_world(cache)
    run_optimize(_config(cache))
    ids = np.full((80, K), 1000)  # caption 1000 exists (ids = 1000 + 7 * permutation)
    world["factory"].retrieve(1, world["keys"][1], ids, np.full((80, K), 0.5))
    assert run_optimize(_config(cache)).shards_run == [1]


def test_a_changed_caption_shard_reruns_every_shard_but_not_perturb(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache)
    run_optimize(_config(cache, method="retrieve"))
    table = pq.read_table(cache / "captions" / "00001.parquet")
    CacheWriter(cache, D).captions(
        1,
        table.column("caption_id").to_numpy(),
        table.column("text").to_pylist(),
        -np.stack(table.column("txt_emb").to_numpy(zero_copy_only=False)),
    )
    plan = plan_optimize(_config(cache, method="retrieve"))
    assert [t.reason for t in plan.tasks] == ["inputs changed"] * 2
    run_optimize(_config(cache, method="perturb"))
    assert plan_optimize(_config(cache, method="perturb")).tasks == []


def test_the_caption_bank_is_loaded_once_per_process(tmp_path, monkeypatch):
    import feature_cache.caption_bank as optimize_inputs

    calls = []
    real = optimize_inputs.load_caption_bank
    monkeypatch.setattr(optimize_inputs, "_BANKS", {})
    monkeypatch.setattr(optimize_inputs, "load_caption_bank", lambda *a: calls.append(1) or real(*a))
    cache = tmp_path / "cache"
    structured_world(cache, shards=(20, 20, 20))
    run_optimize(_config(cache, method="retrieve"))
    run_optimize(_config(cache, method="optimize", steps=1))
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------


def test_a_missing_retrieve_shard_is_a_clear_error_but_perturb_needs_only_embed(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache)
    (cache / "retrieve" / "_manifests" / "00001.json").unlink()
    for method in ("optimize", "retrieve"):
        with pytest.raises(
            ConfigError, match=r"1 of 2 retrieve shard\(s\) are missing \(1\).*`pipeline retrieve"
        ):
            run_optimize(_config(cache, method=method))
    assert not (cache / "optimize").exists()  # refused before any work

    only_embed = tmp_path / "only_embed"
    rng = np.random.default_rng(0)
    CacheWriter(only_embed, D).embed(0, ["a", "b", "c"], _unit(rng.standard_normal((3, D))))
    assert run_optimize(_config(only_embed, method="perturb")).rows_written == 3
    with pytest.raises(ConfigError, match="pipeline retrieve"):
        run_optimize(_config(only_embed, method="retrieve"))


def test_no_embed_stage_and_missing_captions_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no embed stage found"):
        run_optimize(_config(tmp_path / "empty"))
    cache = tmp_path / "cache"
    structured_world(cache)
    for p in (cache / "captions" / "_manifests").iterdir():
        p.unlink()
    with pytest.raises(ConfigError, match=r"no caption features.*pipeline retrieve"):
        run_optimize(_config(cache))


def test_a_retrieve_shard_made_from_an_older_embed_shard_is_refused(tmp_path):
    cache = tmp_path / "cache"
    world = structured_world(cache, shards=(30,))
    table = pq.read_table(cache / "retrieve" / "00000.parquet")
    ids = np.stack(table.column("nbr_ids").to_numpy(zero_copy_only=False))
    world["factory"].retrieve(0, world["keys"][0], ids, np.zeros((30, K)), embed_digest="0" * 32)
    with pytest.raises(ConfigError, match="older embed shard 0.*rerun `pipeline retrieve"):
        run_optimize(_config(cache))


def test_non_finite_and_zero_embeddings_are_skipped_and_counted(tmp_path):
    cache = tmp_path / "cache"
    world = structured_world(cache, shards=(40,))
    img = world["img"][0].copy()
    img[3, 0] = np.nan
    img[7, :] = np.inf
    img[9, :] = 0.0
    world["factory"].embed(0, world["keys"][0], img, None)
    table = pq.read_table(cache / "retrieve" / "00000.parquet")
    world["factory"].retrieve(
        0,
        world["keys"][0],
        np.stack(table.column("nbr_ids").to_numpy(zero_copy_only=False)),
        np.stack(table.column("nbr_sims").to_numpy(zero_copy_only=False)),
    )
    for method in ("optimize", "retrieve", "perturb"):
        result = run_optimize(_config(cache, method=method))
        assert result.dropped == {"non_finite_img_emb": 2, "zero_img_emb": 1}, method
        out = _read(cache)
        expected = [k for i, k in enumerate(world["keys"][0]) if i not in (3, 7, 9)]
        assert out.column("key").to_pylist() == expected
        assert np.isfinite(_pseudo(out)).all() and np.isfinite(out.column("cos_final").to_numpy()).all()
        stats = _stats(cache)
        assert stats["rows_in"] == 40 and stats["written"] == 37
        assert all(np.isfinite(stats[k]) for k in ("cos_init", "cos_final", "loss_final", "top1_final"))


def test_perturb_noise_of_a_row_does_not_depend_on_other_rows_being_skipped(tmp_path):
    rng = np.random.default_rng(3)
    img = _unit(rng.standard_normal((6, D)))
    a, b = tmp_path / "a", tmp_path / "b"
    CacheWriter(a, D).embed(0, list("uvwxyz"), img)
    bad = img.copy()
    bad[1] = np.nan
    CacheWriter(b, D).embed(0, list("uvwxyz"), bad)
    for cache in (a, b):
        run_optimize(_config(cache, method="perturb"))
    ha, hb = _pseudo(_read(a)), _pseudo(_read(b))
    np.testing.assert_array_equal(np.delete(ha, 1, axis=0), hb)


def test_an_empty_shard_writes_an_empty_parquet_with_the_schema(tmp_path):
    cache = tmp_path / "cache"
    world = structured_world(cache, shards=(30, 0))
    for method in ("optimize", "perturb"):
        result = run_optimize(_config(cache, method=method))
        assert result.shards_run == [0, 1] and result.rows_written == 30
        table = _read(cache, 1)
        assert table.num_rows == 0 and table.schema.field("pseudo_txt").type == pa.list_(pa.float16(), D)
        stats = _stats(cache, 1)
        assert stats["written"] == 0 and stats["cos_final"] is None and stats["top1_final"] is None
    assert world["keys"][1] == []
    assert run_optimize(_config(cache, method="perturb")).summary["written"] == 30


def test_a_batch_of_one_keeps_the_retrieve_result_without_nan(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache, shards=(5, 1))
    run_optimize(_config(cache, method="retrieve"))
    retrieved = [_pseudo(_read(cache, s)) for s in (0, 1)]
    for param in ("weights", "residual"):
        run_optimize(_config(cache, method="optimize", param=param, batch_size=1))
        for shard in (0, 1):
            stats = _stats(cache, shard)
            assert stats["batch_size"] == 1 and stats["loss_final"] == 0.0 and stats["top1_final"] == 1.0
            h = _pseudo(_read(cache, shard))
            assert np.isfinite(h).all()
            # a single pair's InfoNCE is constant: only the proximity term acts, and h0 is its minimum
            np.testing.assert_allclose(h, retrieved[shard], atol=1e-3)
    run_optimize(_config(cache, method="optimize", batch_size=65536))  # shard 1 alone is clamped to B=1
    assert _stats(cache, 1)["batch_size"] == 1 and _stats(cache, 0)["batch_size"] == 5


def test_unknown_nbr_ids_are_a_clear_error(tmp_path):
    cache = tmp_path / "cache"
    world = structured_world(cache, shards=(10,))
    ids = np.full((10, K), 1000)
    ids[4, 2] = 999_999
    world["factory"].retrieve(0, world["keys"][0], ids, np.full((10, K), 0.3))
    with pytest.raises(
        ConfigError, match=r"1 nbr_ids \(e.g. 999999\) are not in the caption features.*retrieve"
    ):
        run_optimize(_config(cache))


def test_missing_neighbours_are_masked_and_rows_without_any_are_counted(tmp_path):
    cache = tmp_path / "cache"
    world = structured_world(cache, shards=(12,))
    table = pq.read_table(cache / "retrieve" / "00000.parquet")
    ids = np.stack(table.column("nbr_ids").to_numpy(zero_copy_only=False))
    sims = np.stack(table.column("nbr_sims").to_numpy(zero_copy_only=False))
    ids[0, 1:] = -1  # FAISS pads with -1 when it finds fewer than k
    ids[5, :] = -1
    sims[6, :] = np.nan
    world["factory"].retrieve(0, world["keys"][0], ids, sims)
    run_optimize(_config(cache, method="retrieve"))
    stats = _stats(cache)
    assert stats["dropped"] == {"no_usable_neighbours": 2} and stats["written"] == 10
    out = _read(cache)
    assert world["keys"][0][5] not in out.column("key").to_pylist()
    bank = pa.concat_tables([pq.read_table(cache / "captions" / f"{j:05d}.parquet") for j in (0, 1)])
    row = bank.column("caption_id").to_pylist().index(ids[0, 0])
    only = np.asarray(bank.column("txt_emb")[row].as_py(), np.float32)
    np.testing.assert_allclose(_pseudo(out)[0], only / np.linalg.norm(only), atol=2e-3)  # its one neighbour


def test_retrieve_rows_are_joined_by_key(tmp_path):
    cache = tmp_path / "cache"
    world = structured_world(cache, shards=(10,))
    table = pq.read_table(cache / "retrieve" / "00000.parquet")
    ids = np.stack(table.column("nbr_ids").to_numpy(zero_copy_only=False))
    sims = np.stack(table.column("nbr_sims").to_numpy(zero_copy_only=False))
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1]  # reversed and without row 0
    keys = [world["keys"][0][i] for i in order]
    world["factory"].retrieve(0, keys, ids[order], sims[order])
    run_optimize(_config(cache, method="retrieve"))
    assert _stats(cache)["dropped"] == {"no_retrieve_row": 1}
    assert _read(cache).column("key").to_pylist() == world["keys"][0][1:]
    world["factory"].retrieve(0, keys + ["stranger"], ids[order + [0]], sims[order + [0]])
    with pytest.raises(ConfigError, match="keys do not match the embed shard.*'stranger'"):
        run_optimize(_config(cache, method="retrieve"))


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"method": "clip"}, "--method"),
        ({"param": "both"}, "--param"),
        ({"backend": "cuda"}, "--backend"),
        ({"xi": -1.0}, "--xi"),
        ({"proximity": float("nan")}, "--proximity"),
        ({"tau": 0.0}, "--tau"),
        ({"tau_r": -0.1}, "--tau-r"),
        ({"lr": 0.0}, "--lr"),
        ({"steps": -1}, "--steps"),
        ({"batch_size": 0}, "--batch-size"),
        ({"backend": "triton", "device": "cpu"}, "--backend"),
        ({"precision": "fp16"}, "--precision"),
    ],
)
def test_bad_options_are_config_errors_naming_the_flag(tmp_path, change, flag):
    with pytest.raises(ConfigError, match=f"^{flag} "):
        _config(tmp_path, **change).validate()


# ---------------------------------------------------------------------------------------------------------
# The maths in memory
# ---------------------------------------------------------------------------------------------------------


def test_perturb_is_lafites_formula():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, D, generator=g) * 2.0  # not unit: |f| scales the noise
    eps = torch.randn(5, D, generator=g)
    expected = f + 3.0 * eps * f.norm(dim=1, keepdim=True) / eps.norm(dim=1, keepdim=True)
    torch.testing.assert_close(perturb(f, eps, 3.0), expected / expected.norm(dim=1, keepdim=True))
    torch.testing.assert_close(perturb(f, eps, 0.0), f / f.norm(dim=1, keepdim=True))


def test_retrieve_mix_is_the_softmax_weighted_sum_and_the_mean_at_large_tau():
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(20, D, generator=g), dim=1)
    rows = torch.randint(20, (6, 4), generator=g)
    sims = torch.rand(6, 4, generator=g)
    nbrs = Neighbours(bank, rows, sims, torch.ones(6, 4, dtype=torch.bool))
    f = torch.nn.functional.normalize(torch.randn(6, D, generator=g), dim=1)
    batches = [np.arange(6)]
    for tau_r, weights in ((0.05, torch.softmax(sims / 0.05, dim=1)), (1e6, torch.full((6, 4), 0.25))):
        h = pseudo_txt_features(f, Hyper(method="retrieve", tau_r=tau_r), batches, nbrs=nbrs).h_final
        mixed = (weights[:, :, None] * bank[rows]).sum(1)
        torch.testing.assert_close(h, mixed / mixed.norm(dim=1, keepdim=True))


def test_split_batches_are_a_seeded_near_equal_partition():
    batches = split_batches(10, 4, np.random.default_rng(0))
    assert [len(b) for b in batches] == [4, 3, 3]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert [len(b) for b in split_batches(65_537, 65_536, np.random.default_rng(0))] == [32_769, 32_768]
    assert [len(b) for b in split_batches(3, 65_536, np.random.default_rng(0))] == [3]
    assert split_batches(0, 8, np.random.default_rng(0)) == []
    a = split_batches(50, 8, np.random.default_rng(1))
    b = split_batches(50, 8, np.random.default_rng(1))
    assert all((x == y).all() for x, y in zip(a, b, strict=True))


def test_chunked_top1_and_nearest_rows_match_brute_force(monkeypatch):
    import methods.common as methods

    monkeypatch.setattr(methods, "SCORE_BLOCK", 64)  # force many chunks
    g = torch.Generator().manual_seed(2)
    h = torch.randn(37, D, generator=g)
    f = h + 1.5 * torch.randn(37, D, generator=g)
    assert in_batch_top1(h, f) == int(((h @ f.T).argmax(1) == torch.arange(37)).sum())
    bank = torch.randn(101, D, generator=g).half()
    usable = torch.ones(101, dtype=torch.bool)
    usable[::3] = False
    scores = h @ bank.float().T
    scores[:, ~usable] = float("-inf")
    assert torch.equal(nearest_rows(h, bank, usable), scores.argmax(1))
    assert (nearest_rows(h, bank, torch.zeros(101, dtype=torch.bool)) == -1).all()


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

runner = CliRunner()


def _user_error(args, message):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0], result.output
    return result


def test_cli_optimize_runs_and_prints_a_summary(tmp_path):
    cache = tmp_path / "cache"
    structured_world(cache)
    args = ["optimize", "--cache", cache, "--device", "cpu", "--batch-size", "64", "--steps", "5"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "optimize: 2 shard(s) made, 0 up to date; 176 pseudo features (optimize)" in result.output
    assert "in-batch top-1" in result.output and "attribute precision" in result.output
    assert _stats(cache)["steps"] == 5
    again = runner.invoke(app, [str(a) for a in args])
    assert "0 shard(s) made, 2 up to date" in again.output
    dry = runner.invoke(app, [str(a) for a in [*args, "--method", "perturb", "--dry-run"]])
    assert dry.exit_code == 0, dry.output
    reason = "params changed: batch_size, lr, method, param, proximity, steps, tau, tau_r, xi"
    assert json.loads(dry.output)["shards_to_run"] == {"0": reason, "1": reason}


def test_cli_optimize_errors_are_one_line(tmp_path):
    cache = tmp_path / "cache"
    _user_error(["optimize", "--cache", cache], "no embed stage found")
    structured_world(cache, shards=(10,))
    _user_error(["optimize", "--cache", cache, "--method", "clip"], "--method must be one of")
    _user_error(["optimize", "--cache", cache, "--steps", "-2"], "--steps must be")
    (cache / "retrieve" / "_manifests" / "00000.json").unlink()
    _user_error(["optimize", "--cache", cache, "--device", "cpu"], "run `pipeline retrieve")
