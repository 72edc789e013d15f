"""The FAISS side of the index step (pipeline/retrieve/index.py): which index a corpus gets (`choose_index`),
building and training it on a fixed random sample, tuning nprobe to a target recall against exact search, and
the exact fp16 matmul top-k that `--index gpu-flat` searches with. Arrays in, indexes and numbers out: no
files.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError
from pipeline.retrieve.config import AUTO, GPU_FLAT

if TYPE_CHECKING:
    from pipeline.retrieve.config import IndexConfig


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""  # unreachable


EXACT_BELOW = 50_000  # `auto` is exact below this many captions: Flat search of 50k x 512 is ~2 ms/query/core


TRAIN_PER_LIST = 50  # training vectors per IVF list: faiss wants >= 39 and subsamples above 256


MIN_TRAIN = 10_000  # PQ codebooks (256 centroids per sub-quantizer) want >= 39 * 256 vectors


PQ_M = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4)  # PQ sub-quantizers tried, most accurate first


ADD_CHUNK = 65_536  # vectors per add() call (progress granularity)


@dataclass(frozen=True)
class IndexChoice:
    factory: str  # the FAISS factory string built
    nlist: int  # IVF lists (0: not an IVF index)
    pq_m: int  # PQ sub-quantizers (0: no PQ)
    memory_bytes: int  # expected memory of the built index (codes + ids + centroids)
    method: str  # "faiss" or "gpu-flat" (exact torch fp16 matmul top-k on CUDA)
    tuned: bool  # whether nprobe is tuned (IVF); exact indexes have recall 1 by construction
    why: str  # one line: why this index


def auto_nlist(n: int) -> int:
    """2^round(log2(4 sqrt(N))), at most the power of two that leaves >= 39 training vectors per list."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    cap = 2 ** int(math.log2(max(n // 39, 1)))
    return max(1, min(nlist, cap))


def ivf_memory(n: int, dim: int, nlist: int, code_size: int) -> int:
    """IVF: a code and an int64 id per vector, plus the coarse centroids (float32)."""
    return n * (code_size + 8) + nlist * dim * 4


def choose_index(n: int, dim: int, request: str = AUTO, max_memory: int = 0) -> IndexChoice:
    """Resolve `--index` for N vectors of dimension `dim`; raises ConfigError if nothing fits the budget."""
    limit = f"--max-index-memory {human_bytes(max_memory)}"
    if request == GPU_FLAT:
        return IndexChoice(
            "Flat",
            0,
            0,
            n * dim * 2,
            GPU_FLAT,
            False,
            "exact fp16 matmul top-k on the GPU (corpus held in GPU memory)",
        )
    if request != AUTO:
        choice = _explicit(request, n, dim)
        if max_memory and choice.memory_bytes > max_memory:
            raise ConfigError(
                f"--index {request} needs about {human_bytes(choice.memory_bytes)} for {n:,} captions, more "
                f"than {limit}; raise the limit or use --index auto"
            )
        return choice
    flat = n * dim * 4
    if n < EXACT_BELOW and (not max_memory or flat <= max_memory):
        return IndexChoice("Flat", 0, 0, flat, "faiss", False, f"N = {n:,} < {EXACT_BELOW:,}: exact search")
    nlist = auto_nlist(n)
    ivf_flat = ivf_memory(n, dim, nlist, dim * 4)
    if not max_memory or ivf_flat <= max_memory:
        why = f"N = {n:,}: nlist = 2^round(log2(4 sqrt N)) = {nlist}"
        return IndexChoice(f"IVF{nlist},Flat", nlist, 0, ivf_flat, "faiss", True, why)
    for m in PQ_M:
        if m <= dim and dim % m == 0:
            memory = ivf_memory(n, dim, nlist, m) + 256 * dim * 4
            if memory <= max_memory:
                why = (
                    f"IVF{nlist},Flat needs {human_bytes(ivf_flat)} > {limit}: PQ{m} ({m} bytes/vector) fits"
                )
                return IndexChoice(f"IVF{nlist},PQ{m}", nlist, m, memory, "faiss", True, why)
    smallest = min((m for m in PQ_M if dim % m == 0), default=dim)
    need = ivf_memory(n, dim, nlist, smallest) + 256 * dim * 4
    raise ConfigError(
        f"{limit} is too small for {n:,} captions of dimension {dim}: even IVF{nlist},PQ{smallest} needs "
        f"{human_bytes(need)}"
    )


def _explicit(factory: str, n: int, dim: int) -> IndexChoice:
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ConfigError(
            f"--index {factory}: not auto, gpu-flat or a valid FAISS factory string ({detail})"
        ) from None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    try:
        code_size = index.sa_code_size()
    except RuntimeError:
        code_size = dim * 4
    if ivf is not None:
        memory = ivf_memory(n, dim, ivf.nlist, ivf.code_size)
        pq = re.search(r"PQ(\d+)", factory)
        return IndexChoice(
            factory, int(ivf.nlist), int(pq.group(1)) if pq else 0, memory, "faiss", True, "explicit factory"
        )
    return IndexChoice(factory, 0, 0, n * code_size, "faiss", False, "explicit factory")


def describe_choice(choice: IndexChoice, config: IndexConfig, n: int) -> dict[str, Any]:
    if choice.method == GPU_FLAT:
        policy = "none: exact (fp16 candidates re-ranked in fp32)"
        device = "torch on CUDA"
    elif choice.tuned:
        policy = (
            f"tuned: smallest nprobe with recall@{config.k} >= {config.target_recall} against exact "
            f"search on {config.tune_queries} held-out image queries (seed {config.seed})"
        )
        device = _faiss_device(config.threads)
    else:
        policy = "none: exact search" if choice.factory == "Flat" else "none: recall measured, not tuned"
        device = _faiss_device(config.threads)
    return {
        "request": config.index,
        "factory": choice.factory,
        "nlist": choice.nlist,
        "pq_m": choice.pq_m,
        "why": choice.why,
        "nprobe_policy": policy,
        "train_size": train_size(config, choice, n) if choice.nlist or choice.pq_m else 0,
        "expected_memory": human_bytes(choice.memory_bytes)
        + (" of GPU memory" if choice.method == GPU_FLAT else ""),
        "vectors": n,
        "device": device,
    }


def faiss_gpus() -> int:
    import faiss

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu builds without the GPU module
        return 0


def _faiss_device(threads: int) -> str:
    gpus = faiss_gpus()
    return f"faiss-gpu on {gpus} GPU(s)" if gpus else f"faiss-cpu, {threads} threads"


def train_size(config: IndexConfig, choice: IndexChoice, n: int) -> int:
    if config.train_size:
        return min(n, config.train_size)
    return min(n, max(TRAIN_PER_LIST * choice.nlist, MIN_TRAIN))


def train_sample_ids(n: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct row ids drawn uniformly from [0, n) with a fixed seed, sorted (for cheap reads)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def exact_search(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (faiss brute force, BLAS): (sims float32 [q, k], ids int64 [q, k])."""
    import faiss

    if len(queries) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    sims, ids = faiss.knn(
        np.ascontiguousarray(queries, np.float32),
        np.ascontiguousarray(db, np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return sims, ids


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / k (the usual ANN recall@k)."""
    if len(exact) == 0:
        return 1.0
    return float(per_query_recall(found, exact).mean())


def per_query_recall(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=2).sum(axis=1)
    return hits / exact.shape[1]


def set_nprobe(index, nprobe: int) -> None:
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    except RuntimeError:  # a GPU index: set through the GPU parameter space
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def build_faiss_index(
    db: np.ndarray,
    factory: str,
    *,
    n_train: int,
    seed: int,
    use_gpus: bool = False,
    advance: Callable = lambda n=0, dropped=(): None,
):
    """Train on a random sample of `n_train` rows, then add all rows in order (row i gets id i).

    Returns (CPU index, info dict with train/add seconds and whether GPUs were used).
    """
    import faiss

    n, dim = db.shape
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf.cp.seed = seed
        if ivf.nlist > n_train:
            raise ConfigError(
                f"--index {factory}: {ivf.nlist} IVF lists need at least as many training vectors, and the "
                f"corpus has {n_train:,}; use fewer lists or --index auto"
            )
        sub = getattr(ivf, "pq", None)
        if sub is not None:
            sub.cp.seed = seed
    work, gpus = index, 0
    if use_gpus:
        try:  # train and add on every GPU, then bring the index back to the CPU to write it
            work, gpus = faiss.index_cpu_to_all_gpus(index), faiss_gpus()
        except RuntimeError:
            work, gpus = index, 0  # not every index type has a GPU version
    t0 = time.perf_counter()
    trained_on = 0
    if not work.is_trained:
        sample_ids = train_sample_ids(n, n_train, seed)
        work.train(np.ascontiguousarray(db[sample_ids], np.float32))
        trained_on = len(sample_ids)
    t1 = time.perf_counter()
    for start in range(0, n, ADD_CHUNK):
        work.add(np.ascontiguousarray(db[start : start + ADD_CHUNK], np.float32))
        advance(min(ADD_CHUNK, n - start))
    t2 = time.perf_counter()
    if gpus:
        index = faiss.index_gpu_to_cpu(work)
    info = {
        "train_s": round(t1 - t0, 3),
        "add_s": round(t2 - t1, 3),
        "train_size": int(trained_on),
        "gpus": gpus,
    }
    return index, info


def tune_nprobe(
    index,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    target: float,
    *,
    nlist: int | None = None,
    advance: Callable = lambda n=0, dropped=(): None,
) -> tuple[int, float, dict[int, float]]:
    """Smallest nprobe whose recall@k reaches `target` with 95% confidence: its mean over the queries minus
    1.645 standard errors must reach the target, so queries the tuning never saw also reach it (tuned to the
    bare mean, 1,000 queries land on 0.949 as often as on 0.951). Search: doubling from 1, then bisection
    between the last failing and the first passing power of two (to within 1/16).

    Returns (nprobe, mean recall, {nprobe tried: mean recall}). When even nprobe = nlist misses the target
    (PQ codes), returns nlist and its recall.
    """
    import faiss

    nlist = int(nlist or faiss.extract_index_ivf(index).nlist)  # a GPU index cannot be introspected
    k = exact_ids.shape[1]
    curve: dict[int, float] = {}
    passes: dict[int, bool] = {}

    def measure(p: int) -> bool:
        set_nprobe(index, p)
        _, ids = index.search(np.ascontiguousarray(queries, np.float32), k)
        recalls = per_query_recall(ids, exact_ids)
        curve[p] = float(recalls.mean())
        stderr = float(recalls.std(ddof=1) / np.sqrt(len(recalls))) if len(recalls) > 1 else 0.0
        passes[p] = curve[p] >= target + (1.645 * stderr if target < 1.0 else 0.0)
        advance(1)
        return passes[p]

    failing, p = 0, 1
    while not measure(p) and p < nlist:
        failing, p = p, min(2 * p, nlist)
    if passes[p]:
        passing = p
        while passing - failing > max(1, passing // 16):
            mid = (failing + passing) // 2
            if measure(mid):
                passing = mid
            else:
                failing = mid
        p = passing
    set_nprobe(index, p)
    return p, curve[p], dict(sorted(curve.items()))


def topk_matmul(db, queries, k: int, *, query_chunk: int = 4096, db_chunk: int = 262_144, rerank: int = 2):
    """Exact top-k inner product by chunked matmul in `db`'s dtype and device (fp16 on CUDA, fp32 on CPU).

    db: [N, D] tensor; queries: [Q, D] tensor (any dtype/device: moved to db's). Memory is bounded by
    query_chunk x db_chunk scores. In fp16 the scores are rounded to ~5e-4, which reorders near-ties, so
    the best `rerank * k` candidates are re-scored in fp32 from the same stored vectors and the top k of
    those kept: results then agree with fp32 exact search. Returns (sims float32 [Q, k], ids int64 [Q, k])
    on db's device.
    """
    import torch

    n = db.shape[0]
    if k > n:
        raise ConfigError(f"--k {k} is larger than the caption corpus ({n:,} captions)")
    kk = min(n, k * max(rerank, 1)) if db.dtype != torch.float32 else k
    out_sims, out_ids = [], []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs : qs + query_chunk].to(db.device)
        q_lo = q.to(db.dtype)
        best_s = best_i = None
        for ds in range(0, n, db_chunk):
            scores = q_lo @ db[ds : ds + db_chunk].T  # [q, db_chunk]
            s, i = scores.topk(min(kk, scores.shape[1]), dim=1)
            i = i + ds
            if best_s is None:
                best_s, best_i = s, i
            else:  # merge with the best so far: top-kk of the 2*kk candidates
                s, j = torch.cat([best_s, s], 1).topk(min(kk, best_s.shape[1] + s.shape[1]), dim=1)
                best_i = torch.cat([best_i, i], 1).gather(1, j)
                best_s = s
        if kk > k or db.dtype != torch.float32:  # re-score the candidates exactly in fp32
            cand = db[best_i].float()  # [q, kk, D]
            exact = torch.bmm(cand, q.float().unsqueeze(2)).squeeze(2)  # [q, kk]
            best_s, j = exact.topk(k, dim=1)
            best_i = best_i.gather(1, j)
        out_sims.append(best_s.float())
        out_ids.append(best_i.long())
    if not out_sims:
        return (
            torch.zeros((0, k), dtype=torch.float32, device=db.device),
            torch.zeros((0, k), dtype=torch.long, device=db.device),
        )
    return torch.cat(out_sims), torch.cat(out_ids)


def is_ivf(index) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def to_gpus(index):
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:
        return index
