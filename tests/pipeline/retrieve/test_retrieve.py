"""`pipeline retrieve` end to end: outputs line up with embed, exact search, precision, reruns, CLI."""

from __future__ import annotations

import json
import shutil
import tarfile

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from factories import TINY_CLIP
from typer.testing import CliRunner

from cli.pipeline import app
from core.errors import ConfigError
from feature_cache.layout import retrieve_schema
from pipeline.embed.config import EmbedConfig
from pipeline.embed.stage import run_embed
from pipeline.retrieve import search
from pipeline.retrieve import stage as rt
from pipeline.retrieve.captions import read_caption_shard
from pipeline.retrieve.config import IndexConfig, RetrieveConfig, SearchConfig
from pipeline.retrieve.faiss_index import set_nprobe
from pipeline.retrieve.index import INDEX_FILE, read_embeddings, run_index
from world.synth import SynthConfig, run_synth

K = 8
runner = CliRunner()


def _config(cache, corpus, **kw):
    kw.setdefault("k", K)
    kw.setdefault("caption_shard_size", 150)
    kw.setdefault("batch_size", 128)
    kw.setdefault("device", "cpu")
    return RetrieveConfig.from_options(captions=[str(corpus)], cache=cache, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A synthetic world (60 labelled images in 3 shards + an empty shard, 400 captions), embedded and
    retrieved once; tests that change the cache work on a copy."""
    root = tmp_path_factory.mktemp("retrieve")
    world = run_synth(SynthConfig(out=root / "world", n=60, shard_size=20, n_captions=400, image_size=32))
    empty = root / "empty.tar"
    tarfile.open(empty, "w").close()
    cache = root / "cache"
    inputs = (*(str(s) for s in world.shards), str(empty))
    run_embed(
        EmbedConfig(
            inputs=inputs, cache=cache, clip_model=TINY_CLIP, clip_pretrained="", image_size=32, workers=0
        )
    )
    result = rt.run_retrieve(_config(cache, world.captions_txt))
    return {
        "root": root,
        "cache": cache,
        "corpus": world.captions_txt,
        "world": world,
        "result": result,
        "inputs": inputs,
    }


@pytest.fixture
def cache(base, tmp_path):
    shutil.copytree(base["cache"], tmp_path / "cache")
    return tmp_path / "cache"


def _caption_bank(cache):
    shards = [read_caption_shard(p) for p in sorted((cache / "captions").glob("*.parquet"))]
    ids = np.concatenate([s["caption_id"] for s in shards])
    assert np.array_equal(ids, np.arange(len(ids)))
    return np.concatenate([s["txt_emb"] for s in shards]).astype(np.float32), sum(
        (s["text"] for s in shards), []
    )


def _retrieved(cache, shard):
    table = pq.read_table(cache / "retrieve" / f"{shard:05d}.parquet")
    k = table.schema.field("nbr_ids").type.list_size
    ids = np.array(table.column("nbr_ids").to_pylist(), np.int64).reshape(table.num_rows, k)
    sims = np.array(table.column("nbr_sims").to_pylist(), np.float32).reshape(table.num_rows, k)
    return table, ids, sims


def test_first_run_made_every_step(base):
    result = base["result"]
    captions, index = result.steps["captions"], result.steps["index"]
    assert captions.shards_run == [0, 1, 2] and captions.summary["n_captions"] == 400
    assert index.shards_run and index.summary["factory"] == "Flat"
    assert result.shards_run == [0, 1, 2, 3] and result.rows_written == 60
    info = json.loads((base["cache"] / "index" / "index.json").read_text())
    assert (
        info["n_vectors"] == 400 and info["recall_at_k"] == 1.0 and info["tune_queries"]["source"] == "image"
    )
    for key in ("factory", "nlist", "nprobe", "train_size", "train_seed", "build_s", "recall_at_k"):
        assert key in info


def test_outputs_line_up_with_embed_shards_and_equal_brute_force_top_k(base):
    cache = base["cache"]
    db, _ = _caption_bank(cache)
    for shard in range(4):
        embed = pq.read_table(cache / "embed" / f"{shard:05d}.parquet", columns=["key"])
        table, ids, sims = _retrieved(cache, shard)
        assert table.schema == retrieve_schema(K)
        assert table.column("key").to_pylist() == embed.column("key").to_pylist()  # same keys, same order
        queries = read_embeddings(cache / "embed" / f"{shard:05d}.parquet").astype(np.float64)
        scores = queries @ db.astype(np.float64).T
        ref_ids = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        ref_sims = np.take_along_axis(scores, ref_ids, axis=1)
        np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
        # ids agree except where two captions tie to within float32 rounding
        ties = np.abs(np.take_along_axis(scores, ids, axis=1) - ref_sims) < 1e-6
        assert np.all((ids == ref_ids) | ties)
        assert np.all(np.diff(sims, axis=1) <= 1e-7)  # best first
    assert _retrieved(cache, 3)[0].num_rows == 0  # the empty embed shard


def test_stats_report_attribute_precision_of_retrieved_captions(base):
    cache = base["cache"]
    stats = json.loads((cache / "retrieve" / "_stats" / "00000.json").read_text())
    precision = stats["precision"]
    assert precision["n_scored"] == stats["rows"] == 20 and precision["k"] == K
    for at in ("precision_at_1", "precision_at_k"):
        assert set(precision[at]) == {"shape", "colour", "size", "position", "object", "mean"}
        assert all(0.0 <= v <= 1.0 for v in precision[at].values())
    # Recompute precision@1 for shape from the outputs, the caption texts and the image labels.
    _, texts = _caption_bank(cache)
    _, ids, _ = _retrieved(cache, 0)
    labels = pq.read_table(cache / "embed" / "00000.parquet", columns=["labels"]).column(0).to_pylist()
    from world.attribute_precision import matching_object
    from world.grammar import parse_caption

    hits = []
    for label, row in zip(labels, ids, strict=True):
        target = json.loads(label)["objects"][0]
        best = matching_object(target, parse_caption(texts[row[0]]))
        hits.append(best is not None and best.get("shape") == target["shape"])
    assert precision["precision_at_1"]["shape"] == pytest.approx(np.mean(hits), abs=1e-4)
    empty = json.loads((cache / "retrieve" / "_stats" / "00003.json").read_text())
    assert empty["rows"] == 0 and empty["precision"] is None


def test_score_attributes_on_hand_made_captions():
    red_left = {"shape": "circle", "colour": "red", "size": "small", "position": "left"}
    blue_top = {"shape": "square", "colour": "blue", "size": "large", "position": "top"}
    labels = [
        json.dumps({"objects": [red_left, blue_top]}),  # target: the first object, red_left
        json.dumps({"objects": [blue_top]}),
        None,  # not labelled: not scored
    ]
    nbr_texts = [
        [
            "a big blue box at the top, and a small red disc on the left",  # second object matches fully
            "a small green circle on the right",  # shape and size only
            "nothing to parse here",  # misses everything
        ],
        ["a large blue square at the top", "a large blue square at the top", "a small blue square on top"],
        ["x", "y", "z"],
    ]
    score = search.score_attributes(labels, nbr_texts)
    assert score["n_scored"] == 2 and score["k"] == 3
    assert score["precision_at_1"] == {
        "shape": 1.0,
        "colour": 1.0,
        "size": 1.0,
        "position": 1.0,
        "object": 1.0,
        "mean": 1.0,
    }
    at_k = score["precision_at_k"]
    assert at_k["shape"] == pytest.approx((2 + 3) / 6, abs=1e-4)
    assert at_k["colour"] == pytest.approx((1 + 3) / 6, abs=1e-4)
    assert at_k["size"] == pytest.approx((2 + 2) / 6, abs=1e-4)
    assert at_k["position"] == pytest.approx((1 + 3) / 6, abs=1e-4)
    assert at_k["object"] == pytest.approx((1 + 2) / 6, abs=1e-4)
    assert at_k["mean"] == pytest.approx((5 + 4 + 4 + 4) / 24, abs=1e-4)
    assert search.score_attributes([None], [["a red circle"]]) is None


def test_rerun_is_a_noop_and_a_new_embed_shard_is_searched_alone(cache, base):
    again = rt.run_retrieve(_config(cache, base["corpus"]))
    assert again.steps["captions"].shards_run == [] and not again.steps["index"].shards_run
    assert again.shards_run == []
    extra = run_synth(  # its 13th shard holds keys 60-64, which the cache's 60 images do not
        SynthConfig(out=base["root"] / "more", n=65, shard_size=5, n_captions=40, seed=3, image_size=32)
    )
    run_embed(
        EmbedConfig(
            inputs=(*base["inputs"], str(extra.shards[12])),  # embed takes all inputs: the old and one new
            cache=cache,
            clip_model=TINY_CLIP,
            clip_pretrained="",
            image_size=32,
            workers=0,
        )
    )
    grown = rt.run_retrieve(_config(cache, base["corpus"]))
    assert not grown.steps["index"].shards_run
    assert grown.shards_run == [4] and grown.shards_up_to_date == [0, 1, 2, 3]
    assert _retrieved(cache, 4)[0].num_rows == 5


def test_identical_index_bytes_stop_the_cascade_and_k_restales_search(cache, base):
    digest = json.loads((cache / "index" / "_manifests" / "00000.json").read_text())["outs"][0]["digest"]
    rebuilt = run_index(IndexConfig(cache=cache, k=K, force=True), _outs(cache), 400, 64)
    assert rebuilt.shards_run == [0]
    assert (
        json.loads((cache / "index" / "_manifests" / "00000.json").read_text())["outs"][0]["digest"] == digest
    )
    assert search.plan_search(SearchConfig(cache=cache, k=K)).tasks == []  # same bytes: nothing to redo
    smaller = rt.run_retrieve(_config(cache, base["corpus"], k=4))
    assert smaller.steps["index"].shards_run  # k is keyed for the search
    assert smaller.shards_run == [0, 1, 2, 3]
    assert _retrieved(cache, 0)[1].shape == (20, 4)
    assert search.plan_search(SearchConfig(cache=cache, k=4)).tasks == []


def _outs(cache):
    from pipeline.retrieve.captions import caption_shard_outputs

    return caption_shard_outputs(cache, 3)


def test_changed_captions_rebuild_the_index_and_restale_every_shard(cache, base, tmp_path):
    corpus = tmp_path / "more.txt"
    corpus.write_text(base["corpus"].read_text() + "a tiny violet star in the middle\n")
    result = rt.run_retrieve(_config(cache, corpus))
    assert result.steps["captions"].shards_run == [2] and result.steps["captions"].summary["encoded"] == 1
    assert result.steps["index"].shards_run and result.steps["index"].summary["n_vectors"] == 401
    assert result.shards_run == [0, 1, 2, 3]


def test_ivf_index_is_tuned_recorded_and_reloads_with_plain_faiss(cache, base):
    result = rt.run_retrieve(_config(cache, base["corpus"], index="IVF8,Flat", target_recall=0.9))
    info = json.loads((cache / "index" / "index.json").read_text())
    assert info["factory"] == "IVF8,Flat" and info["nlist"] == 8 and 1 <= info["nprobe"] <= 8
    assert info["recall_at_k"] >= 0.9 and info["target_reached"] and info["train_size"] == 400
    assert info["nprobe_curve"][str(info["nprobe"])] == info["recall_at_k"]
    assert result.shards_run == [0, 1, 2, 3]
    index = faiss.read_index(str(cache / INDEX_FILE))
    assert faiss.extract_index_ivf(index).nprobe == info["nprobe"]  # the tuned nprobe travels in the file
    queries = read_embeddings(cache / "embed" / "00001.parquet").astype(np.float32)
    sims, ids = index.search(queries, K)
    _, stored_ids, stored_sims = _retrieved(cache, 1)
    np.testing.assert_array_equal(ids, stored_ids)
    np.testing.assert_allclose(sims, stored_sims, rtol=1e-6)


def test_matmul_search_path_on_cpu_matches_flat(cache):
    """The gpu-flat code path (chunked torch top-k over the Flat index' vectors), run in fp32 on the CPU."""
    config = SearchConfig(cache=cache, k=K, gpu_flat=True, matmul_device="cpu", batch_size=7)
    plan = search.plan_search(config)
    assert len(plan.tasks) == 4 and plan.tasks[0].reason == "params changed: method"
    _, flat_ids, flat_sims = _retrieved(cache, 0)
    for task in plan.tasks:
        manifest = search.search_shard(task)
        assert manifest["params"] == {"k": K, "method": "matmul-fp32"}
    _, ids, sims = _retrieved(cache, 0)
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_allclose(sims, flat_sims, atol=1e-5)
    assert isinstance(search.cached_searcher(config, plan.tasks[0].index_digest), search.MatmulSearcher)


def test_faiss_searcher_fills_short_ivf_probes(cache, base):
    rt.run_retrieve(_config(cache, base["corpus"], index="IVF32,Flat", target_recall=0.3))
    searcher = search.FaissSearcher(cache / INDEX_FILE, threads=1)
    searcher.nprobe = 1
    set_nprobe(searcher.index, 1)
    queries = read_embeddings(cache / "embed" / "00000.parquet").astype(np.float32)
    _, raw_ids = searcher.index.search(queries, 32)
    assert (raw_ids < 0).any()  # one list of ~12 captions cannot give 32 neighbours
    _, ids = searcher.search(queries, 32)
    assert (ids >= 0).all() and all(len(set(row)) == 32 for row in ids)


def test_k_larger_than_the_corpus_is_refused_before_any_work(base, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(base["cache"] / "embed", cache / "embed")
    corpus = tmp_path / "few.txt"
    corpus.write_text("one\ntwo\ntwo\nthree\n")
    with pytest.raises(ConfigError, match="--k 8 is larger than the caption corpus \\(3 unique captions\\)"):
        rt.run_retrieve(_config(cache, corpus))
    assert not (cache / "captions").exists()


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _invoke(args):
    return runner.invoke(app, [str(a) for a in args])


def _user_error(args, message):
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_cli_runs_then_reruns_nothing(cache, base):
    args = ["retrieve", "--cache", cache, "--captions", base["corpus"], "--k", 4, "--caption-shard-size", 150]
    first = _invoke(args)
    assert first.exit_code == 0, first.output
    assert "captions: 0 shard(s) made (0 encoded, 0 truncated), 3 up to date; 400 unique" in first.output
    assert "index: Flat (faiss) built, 400 vectors, recall@4 1.000" in first.output
    assert "retrieve: 4 shard(s) made, 0 up to date; 60 images searched; precision@1 shape" in first.output
    second = _invoke(args)
    assert "index: Flat (faiss) up to date" in second.output and "retrieve: 0 shard(s) made" in second.output


def test_cli_dry_run_prints_the_plan_and_writes_nothing(base, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(base["cache"] / "embed", cache / "embed")
    result = _invoke(
        ["retrieve", "--cache", cache, "--captions", base["corpus"], "--index", "IVF16,Flat", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (
        plan["captions"]["to_run"] == {"0": "new shard"}
        and plan["captions"]["corpus"]["unique_captions"] == 400
    )
    index = plan["index"]
    assert (index["factory"], index["nlist"], index["status"]) == (
        "IVF16,Flat",
        16,
        "pending: caption shards will change",
    )
    assert index["expected_memory"].endswith("KiB") and "tuned" in index["nprobe_policy"]
    assert plan["retrieve"]["to_run"] == "all" and plan["retrieve"]["shards"] == 4
    assert sorted(p.name for p in cache.iterdir()) == ["embed"]


def test_cli_dry_run_on_an_up_to_date_cache(base):
    result = _invoke(
        [
            "retrieve",
            "--cache",
            base["cache"],
            "--captions",
            base["corpus"],
            "--k",
            K,
            "--caption-shard-size",
            150,
            "--dry-run",
        ]
    )
    plan = json.loads(result.stdout)
    assert plan["index"]["status"] == "up to date" and plan["index"]["factory"] == "Flat"
    assert plan["retrieve"]["to_run"] == {} and plan["retrieve"]["up_to_date"] == 4


def test_cli_errors_exit_2_with_one_line(base, tmp_path):
    cache = base["cache"]
    _user_error(["retrieve", "--cache", cache], "--captions")
    _user_error(["retrieve", "--cache", cache, "--captions", tmp_path / "missing.txt"], "no such file")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    _user_error(["retrieve", "--cache", cache, "--captions", blank, "--dry-run"], "no usable captions")
    _user_error(
        ["retrieve", "--cache", cache, "--captions", base["corpus"], "--k", 401, "--dry-run"],
        "--k 401 is larger than the caption corpus (400 unique captions)",
    )
    _user_error(["retrieve", "--cache", tmp_path / "nocache", "--captions", base["corpus"]], "no embed stage")
    _user_error(
        ["retrieve", "--cache", cache, "--captions", base["corpus"], "--index", "IVFx", "--dry-run"],
        "--index IVFx",
    )
    _user_error(
        ["retrieve", "--cache", cache, "--captions", base["corpus"], "--max-index-memory", "lots"],
        "--max-index-memory lots",
    )
    parquet = base["world"].captions_parquet
    _user_error(
        ["retrieve", "--cache", cache, "--captions", parquet, "--caption-column", "text", "--dry-run"],
        "--caption-column text: not a column",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_gpu_flat_without_cuda_is_refused(base):
    _user_error(
        ["retrieve", "--cache", base["cache"], "--captions", base["corpus"], "--index", "gpu-flat"],
        "--index gpu-flat needs a CUDA GPU",
    )
