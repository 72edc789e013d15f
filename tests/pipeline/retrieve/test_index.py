"""Retrieve step 2 (pipeline/retrieve/index.py): index choice, exact search, IVF training and tuning, matmul
top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from pipeline.retrieve import index as ix
from pipeline.retrieve.config import GPU_FLAT, IndexConfig, parse_size


def clustered(n: int, dim: int, *, centres: int, seed: int, offset: float = 0.0, spread: float = 0.5):
    """Unit vectors from a mixture of Gaussians on the sphere; `offset` shifts them along a common direction
    (image queries sit apart from caption vectors in CLIP space)."""
    rng = np.random.default_rng(1234)  # the same centres for database and queries
    mu = rng.standard_normal((centres, dim)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    shift = rng.standard_normal(dim).astype(np.float32)
    shift /= np.linalg.norm(shift)
    rng = np.random.default_rng(seed)
    x = mu[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(
        dim
    )
    x += offset * shift
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_topk(db: np.ndarray, queries: np.ndarray, k: int):
    scores = queries.astype(np.float64) @ db.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


@pytest.fixture(scope="module")
def data():
    # Overlapping clusters (spread 1.0): nprobe 1 reaches only ~0.6 recall@16, so tuning has work to do.
    db = clustered(20_000, 32, centres=200, seed=0, spread=1.0)
    tune = clustered(500, 32, centres=200, seed=1, offset=0.6, spread=1.0)
    fresh = clustered(500, 32, centres=200, seed=2, offset=0.6, spread=1.0)
    return db, tune, fresh


def test_auto_picks_flat_for_small_corpora_and_ivf_for_large():
    assert ix.choose_index(1_000, 512).factory == "Flat"
    assert ix.choose_index(49_999, 512).factory == "Flat"
    assert ix.choose_index(50_000, 512).factory == "IVF1024,Flat"  # 4 sqrt(50k) = 894 -> 2^10
    assert ix.choose_index(100_000, 512).factory == "IVF1024,Flat"  # 1265 -> 2^10
    big = ix.choose_index(1_000_000, 512)
    assert (big.factory, big.nlist, big.tuned) == ("IVF4096,Flat", 4096, True)  # 4000 -> 2^12
    assert big.memory_bytes == 1_000_000 * (512 * 4 + 8) + 4096 * 512 * 4
    assert ix.choose_index(10_000_000, 512).nlist == 16384  # 12649 -> 2^14


def test_auto_uses_pq_when_the_memory_budget_requires_it():
    fits = ix.choose_index(1_000_000, 512, max_memory=parse_size("3GB"))
    assert fits.factory == "IVF4096,Flat"
    pq = ix.choose_index(1_000_000, 512, max_memory=parse_size("1GB"))
    assert (pq.factory, pq.pq_m) == ("IVF4096,PQ128", 128) and pq.memory_bytes <= 1e9
    smaller = ix.choose_index(1_000_000, 512, max_memory=parse_size("100MB"))
    assert smaller.factory == "IVF4096,PQ64" and smaller.memory_bytes <= 100e6
    small_corpus = ix.choose_index(20_000, 512, max_memory=parse_size("10MB"))  # Flat needs 41 MB
    assert small_corpus.factory.startswith("IVF") and "PQ" in small_corpus.factory
    with pytest.raises(ConfigError, match="--max-index-memory .* too small"):
        ix.choose_index(1_000_000, 512, max_memory=parse_size("1MB"))


def test_explicit_factories_and_gpu_flat():
    ivf = ix.choose_index(10_000, 64, "IVF64,Flat")
    assert (ivf.factory, ivf.nlist, ivf.tuned) == ("IVF64,Flat", 64, True)
    assert ix.choose_index(10_000, 64, "HNSW32").tuned is False
    gpu = ix.choose_index(1_000_000, 512, GPU_FLAT)
    assert (gpu.factory, gpu.method, gpu.memory_bytes) == ("Flat", GPU_FLAT, 1_000_000 * 512 * 2)
    with pytest.raises(ConfigError, match="--index IVFx,Flat: not auto, gpu-flat or a valid FAISS factory"):
        ix.choose_index(10_000, 64, "IVFx,Flat")
    with pytest.raises(ConfigError, match="--index Flat needs about .* more than --max-index-memory"):
        ix.choose_index(1_000_000, 512, "Flat", max_memory=10**9)


def test_parse_size():
    assert parse_size("") == 0 and parse_size("0") == 0
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("123") == 123
    with pytest.raises(ConfigError, match="--max-index-memory lots"):
        parse_size("lots")


def test_training_sample_is_random_with_a_fixed_seed_not_the_first_rows():
    ids = ix.train_sample_ids(10_000, 1_000, seed=0)
    assert len(ids) == 1_000 and len(np.unique(ids)) == 1_000 and np.all(np.diff(ids) > 0)
    assert ids.min() >= 0 and ids.max() < 10_000
    assert ids.max() > 9_000 and not np.array_equal(ids, np.arange(1_000))
    np.testing.assert_array_equal(ids, ix.train_sample_ids(10_000, 1_000, seed=0))
    assert not np.array_equal(ids, ix.train_sample_ids(10_000, 1_000, seed=1))
    np.testing.assert_array_equal(ix.train_sample_ids(50, 100, seed=0), np.arange(50))


def test_recall_at_k():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 2, 1], [5, 6, 0, 9]])
    assert ix.recall_at_k(found, exact) == pytest.approx((4 + 2) / 8)


def test_exact_flat_search_agrees_with_numpy_brute_force():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((3_000, 24)).astype(np.float32)
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    sims, ids = ix.exact_search(db, queries, 10)
    ref_sims, ref_ids = numpy_topk(db, queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-5, atol=1e-5)


def test_ivf_on_clustered_vectors_reaches_the_target_recall(data):
    db, tune, fresh = data
    index, info = ix.build_faiss_index(db, "IVF128,Flat", n_train=6_400, seed=0)
    assert info["train_size"] == 6_400 and index.ntotal == len(db)
    _, exact_tune = ix.exact_search(db, tune, 16)
    nprobe, recall, curve = ix.tune_nprobe(index, tune, exact_tune, 0.95)
    assert recall >= 0.95 and curve[nprobe] == recall
    assert 1 < nprobe < 128 and curve[1] < 0.8  # a real trade-off, and cheaper than probing every list
    assert all(r < recall for p, r in curve.items() if p < nprobe)  # the smallest passing nprobe tried
    assert curve[nprobe - 1] < 0.96  # the confidence margin costs little: one probe less is near the target
    _, exact_fresh = ix.exact_search(db, fresh, 16)
    _, found = index.search(fresh, 16)
    assert ix.recall_at_k(found, exact_fresh) >= 0.95  # held-out queries of the same kind reach it too


def test_unreachable_target_returns_every_list_and_its_recall(data):
    db, tune, _ = data
    index, _ = ix.build_faiss_index(db, "IVF16,PQ4x4", n_train=2_000, seed=0)
    _, exact = ix.exact_search(db, tune, 16)
    nprobe, recall, _ = ix.tune_nprobe(index, tune, exact, 0.999)
    assert nprobe == 16 and recall < 0.999


def test_topk_matmul_fp32_on_cpu_matches_numpy_across_chunks():
    rng = np.random.default_rng(3)
    db = rng.standard_normal((333, 16)).astype(np.float32)
    queries = rng.standard_normal((29, 16)).astype(np.float32)
    ref_sims, ref_ids = numpy_topk(db, queries, 7)
    sims, ids = ix.topk_matmul(torch.from_numpy(db), torch.from_numpy(queries), 7, query_chunk=8, db_chunk=50)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=1e-5, atol=1e-5)
    # k = N, and db chunks smaller than k, still merge correctly
    sims, ids = ix.topk_matmul(torch.from_numpy(db[:12]), torch.from_numpy(queries), 12, db_chunk=5)
    np.testing.assert_array_equal(ids.numpy(), numpy_topk(db[:12], queries, 12)[1])
    with pytest.raises(ConfigError, match="--k 13 is larger than the caption corpus"):
        ix.topk_matmul(torch.from_numpy(db[:12]), torch.from_numpy(queries), 13)


def test_topk_matmul_half_precision_reranks_to_the_exact_order():
    """The GPU path's fp16 candidates + fp32 re-rank, run on the CPU: agrees with fp32 exact search."""
    db = clustered(2_000, 32, centres=20, seed=5, spread=0.1)  # tight clusters: many near-ties in fp16
    queries = clustered(50, 32, centres=20, seed=6, offset=0.5, spread=0.1)
    db16 = torch.from_numpy(db).half()
    exact_sims, exact_ids = numpy_topk(db16.float().numpy(), queries, 8)
    sims, ids = ix.topk_matmul(db16, torch.from_numpy(queries), 8, query_chunk=16, db_chunk=300)
    np.testing.assert_allclose(sims.numpy(), exact_sims, atol=1e-5)
    assert ix.recall_at_k(ids.numpy(), exact_ids) == 1.0
    # Without spare candidates, fp16 rounding loses some of the true top-k: the re-rank is what fixes it.
    _, ids_no_spare = ix.topk_matmul(db16, torch.from_numpy(queries), 8, rerank=1)
    assert ix.recall_at_k(ids_no_spare.numpy(), exact_ids) < 1.0


def test_gpu_flat_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--index gpu-flat needs a CUDA GPU"):
        IndexConfig(index=GPU_FLAT).validate()


def test_config_validation_names_the_flag():
    for kwargs, flag in [
        ({"k": 0}, "--k"),
        ({"target_recall": 1.5}, "--target-recall"),
        ({"index": ""}, "--index"),
        ({"max_index_memory": -1}, "--max-index-memory"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            IndexConfig(**kwargs).validate()
