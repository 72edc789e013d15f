"""Retrieve step 2 of 3: a FAISS index over the caption features, `index/captions.faiss` + `index/index.json`.

Inner product on L2-normalised vectors (cosine). Caption row i of the index is `caption_id` i (the caption
shards number their captions contiguously from 0), so search results are caption ids with no id map.

`--index auto` picks by corpus size N: exact `Flat` below 50k captions; else `IVF{nlist},Flat` with
nlist = 2^round(log2(4 sqrt(N))); else `IVF{nlist},PQ{m}` with the largest m that fits
`--max-index-memory`. An explicit FAISS factory string is taken as given. `gpu-flat` writes a `Flat` index
and the search step runs it as an exact fp16 matmul top-k on the GPU (`topk_matmul`).

Training uses a random sample (fixed seed) of the captions, never the first rows: a corpus is often
sorted (by source, by date), and its head is not its distribution. `nprobe` is tuned to the smallest value
reaching `--target-recall` recall@k against exact search on held-out *image* queries sampled from the
embed shards (images and captions occupy different regions of CLIP space, so caption vectors would be the
wrong queries). Those queries are not a dependency: adding images does not rebuild the index.

This step is one task. It is keyed on the digests of every caption shard's Parquet and on the index
params; its output digest (of `captions.faiss`, which also stores the tuned nprobe) is what the search step
depends on, so a rebuild that reproduces identical bytes remakes no retrieve shard.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from manifests import (
    Dep,
    ShardSpec,
    atomic_write,
    check_shard,
    clean_temp_files,
    commit_manifest,
    list_manifests,
    read_manifest,
    stat_out,
    write_bytes_atomic,
)
from pipeline.errors import ConfigError
from pipeline.layout import shard_file
from pipeline.progress import null_progress

STAGE = "index"
STAGE_VERSION = "1"
SHARD = 0  # a single task
INDEX_FILE = f"{STAGE}/captions.faiss"
INFO_FILE = f"{STAGE}/index.json"
AUTO, GPU_FLAT = "auto", "gpu-flat"
EXACT_BELOW = 50_000  # `auto` is exact below this many captions: Flat search of 50k x 512 is ~2 ms/query/core
TRAIN_PER_LIST = 50  # training vectors per IVF list: faiss wants >= 39 and subsamples above 256
MIN_TRAIN = 10_000  # PQ codebooks (256 centroids per sub-quantizer) want >= 39 * 256 vectors
PQ_M = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4)  # PQ sub-quantizers tried, most accurate first
ADD_CHUNK = 65_536  # vectors per add() call (progress granularity)

# (description, total, unit) -> a context manager yielding advance(n, drop_reasons): `progress_bar`'s shape
ProgressFactory = Callable[..., Any]


@dataclass(frozen=True)
class IndexConfig:
    cache: Path = Path("cache")  # the feature cache
    index: str = AUTO  # "auto", "gpu-flat" or a FAISS factory string ("Flat", "IVF4096,Flat", ...)
    k: int = 16  # neighbours per image: nprobe is tuned for recall@k
    target_recall: float = 0.95  # recall@k against exact search that nprobe must reach
    max_index_memory: int = 0  # bytes the index may take in memory (0: no limit); `auto` picks PQ to fit
    train_size: int = 0  # captions sampled to train IVF/PQ; 0: min(N, max(50 * nlist, 10k))
    tune_queries: int = 1000  # held-out image queries for tuning nprobe and measuring recall
    seed: int = 0  # seed of the training sample and of the held-out queries
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)  # faiss OpenMP threads
    force: bool = False  # rebuild even when up to date

    def validate(self) -> None:
        if not self.index:
            raise ConfigError("--index must be auto, gpu-flat or a FAISS factory string such as IVF4096,Flat")
        if self.k < 1:
            raise ConfigError("--k must be at least 1")
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError("--target-recall must be in (0, 1]")
        if self.max_index_memory < 0:
            raise ConfigError("--max-index-memory must be positive (or 0 for no limit)")
        if self.train_size < 0 or self.tune_queries < 1 or self.threads < 1:
            raise ConfigError("train size, tune queries and threads must be positive")
        if self.index == GPU_FLAT:
            require_cuda("--index gpu-flat")

    def keyed_params(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "k": self.k,
            "target_recall": self.target_recall,
            "max_index_memory": self.max_index_memory,
            "train_size": self.train_size,
            "tune_queries": self.tune_queries,
            "seed": self.seed,
        }


def require_cuda(flag: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"{flag} needs a CUDA GPU, and torch sees none on this machine; use --index auto (or Flat) "
            "to search on the CPU"
        )


def parse_size(text: str | int | None) -> int:
    """'8GB', '512MiB', '2.5G', '1000000' -> bytes; '' or 0 -> 0 (no limit). Decimal and binary units."""
    if text is None or text == "" or text == 0:
        return 0
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ConfigError(f"--max-index-memory {text}: not a size; write e.g. 8GB, 512MiB or 0 for no limit")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(value * base ** " KMGT".index(unit or " "))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""  # unreachable


# ---------------------------------------------------------------------------------------------------------
# Choosing the index
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Pure cores: exact search, recall, building, tuning, matmul top-k
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Inputs: caption vectors and held-out image queries
# ---------------------------------------------------------------------------------------------------------


def read_caption_vectors(cache: Path, outs: list[dict[str, Any]]) -> np.ndarray:
    """All caption vectors, float32 [N, D], row i = caption_id i (checked: the shards must be contiguous)."""
    import pyarrow.parquet as pq

    n, dim = sum(o["rows"] for o in outs), outs[0]["dim"]
    db = np.empty((n, dim), np.float32)
    row = 0
    for out in outs:
        if out["first_caption_id"] != row:
            raise ConfigError(
                f"--cache {cache}: {out['path']} starts at caption_id {out['first_caption_id']}, "
                f"expected {row}; rerun with --force"
            )
        col = pq.read_table(Path(cache) / out["path"], columns=["txt_emb"]).column(0).combine_chunks()
        block = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        db[row : row + len(block)] = block
        row += len(block)
    return db


def read_embeddings(path: Path) -> np.ndarray:
    """`img_emb` of one embed sidecar as float16 [n, D] (n may be 0)."""
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["img_emb"]).column(0)
    dim = col.type.list_size
    if col.num_chunks == 0:
        return np.zeros((0, dim), np.float16)
    return col.combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def sample_image_queries(cache: Path, n: int, seed: int, max_shards: int = 64) -> tuple[np.ndarray, dict]:
    """Up to `n` image embeddings drawn at random (fixed seed) from the embed shards.

    Reads whole shards, so it first picks shards at random until they hold 4n images (or `max_shards`),
    then samples rows from those: bounded I/O on a cache of millions of images.
    """
    manifests = list_manifests(cache, "embed")
    shards = [s for s, m in sorted(manifests.items()) if m.get("rows", 0) > 0]
    rng = np.random.default_rng(seed)
    chosen, total = [], 0
    for pos in rng.permutation(len(shards)):
        if total >= 4 * n or len(chosen) >= max_shards:
            break
        chosen.append(shards[pos])
        total += manifests[shards[pos]]["rows"]
    chosen.sort()
    blocks = [read_embeddings(Path(cache) / shard_file("embed", s)) for s in chosen]
    if not blocks:
        return np.zeros((0, 0), np.float32), {"n": 0, "seed": seed, "embed_shards": []}
    pool = np.concatenate(blocks).astype(np.float32)
    rows = np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))
    return pool[rows], {"n": int(len(rows)), "seed": seed, "embed_shards": chosen}


# ---------------------------------------------------------------------------------------------------------
# The step: plan, task, run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class IndexTask:
    config: IndexConfig
    spec: ShardSpec
    choice: IndexChoice
    caption_outs: list[dict[str, Any]]  # the caption shards' committed parquet outs, in shard order
    reason: str


@dataclass
class IndexPlan:
    task: IndexTask | None  # None: up to date (or captions not committed yet, see `pending`)
    choice: IndexChoice
    n_vectors: int
    reason: str | None  # why it must be built; None when up to date
    pending: bool = False  # the caption shards are not all committed yet (dry run before captions ran)


def plan_index(
    config: IndexConfig, caption_outs: list[dict[str, Any]] | None, n_vectors: int, dim: int
) -> IndexPlan:
    """Decide the index and whether it must be (re)built. `caption_outs` None means captions pending."""
    config.validate()
    choice = choose_index(n_vectors, dim, config.index, config.max_index_memory)
    if config.k > n_vectors:
        raise ConfigError(f"--k {config.k} is larger than the caption corpus ({n_vectors:,} unique captions)")
    if caption_outs is None:
        return IndexPlan(None, choice, n_vectors, "caption shards will change", pending=True)
    deps = [Dep(o["path"], o["digest"]) for o in caption_outs]
    params = {**config.keyed_params(), "dim": dim}
    unkeyed = {"threads": config.threads, "factory": choice.factory}
    spec = ShardSpec(STAGE, SHARD, STAGE_VERSION, params, deps, unkeyed)
    reason = "forced" if config.force else check_shard(config.cache, spec)
    task = IndexTask(config, spec, choice, caption_outs, reason) if reason else None
    return IndexPlan(task, choice, n_vectors, reason)


def index_shard(task: IndexTask, progress: ProgressFactory = null_progress) -> dict[str, Any]:
    """Build, tune, measure and commit the index; returns its manifest."""
    import faiss

    cfg, spec, choice = task.config, task.spec, task.choice
    faiss.omp_set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    db = read_caption_vectors(cfg.cache, task.caption_outs)
    n, dim = db.shape
    queries, query_info = sample_image_queries(cfg.cache, cfg.tune_queries, cfg.seed)
    query_source = "image"
    if len(queries) == 0:  # no image in the cache: fall back to caption vectors (and say so)
        rows = train_sample_ids(n, min(n, cfg.tune_queries), cfg.seed + 1)
        queries, query_source = db[rows], "caption (the cache holds no image)"
        query_info = {"n": int(len(rows)), "seed": cfg.seed + 1, "embed_shards": []}
    k = min(cfg.k, n)
    t_read = time.perf_counter()
    with progress(f"index {choice.factory}", total=n, unit="vec") as advance:
        use_gpus = choice.method == "faiss" and faiss_gpus() > 0
        index, build = build_faiss_index(
            db,
            choice.factory,
            n_train=train_size(cfg, choice, n),
            seed=cfg.seed,
            use_gpus=use_gpus,
            advance=advance,
        )
    t_built = time.perf_counter()
    _, exact_ids = exact_search(db, queries, k)
    nprobe, curve = None, {}
    if choice.method == GPU_FLAT:
        import torch

        db_gpu = torch.from_numpy(db).to("cuda", torch.float16)
        _, ids = topk_matmul(db_gpu, torch.from_numpy(queries), k)
        recall = recall_at_k(ids.cpu().numpy(), exact_ids)
        del db_gpu
    elif _is_ivf(index):
        with progress("index: tune nprobe", total=None, unit="probe") as advance:
            searchable = _to_gpus(index) if build["gpus"] else index
            nlist = faiss.extract_index_ivf(index).nlist
            nprobe, recall, curve = tune_nprobe(
                searchable, queries, exact_ids, cfg.target_recall, nlist=nlist, advance=advance
            )
            set_nprobe(index, nprobe)  # stored in the file: plain faiss.read_index gets it back
    else:
        _, ids = index.search(np.ascontiguousarray(queries), k)
        recall = recall_at_k(ids, exact_ids)
    t_tuned = time.perf_counter()

    info = {
        "factory": choice.factory,
        "request": cfg.index,
        "search": choice.method,
        "metric": "inner_product",
        "why": choice.why,
        "n_vectors": int(n),
        "dim": int(dim),
        "nlist": choice.nlist,
        "pq_m": choice.pq_m,
        "nprobe": nprobe,
        "nprobe_curve": {str(p): round(r, 4) for p, r in curve.items()},
        "train_size": build["train_size"],
        "train_seed": cfg.seed,
        "k": k,
        "target_recall": cfg.target_recall,
        "recall_at_k": round(float(recall), 4),
        "target_reached": bool(recall >= cfg.target_recall),
        "tune_queries": {**query_info, "source": query_source},
        "expected_memory_bytes": choice.memory_bytes,
        "gpus": build["gpus"],
        "threads": cfg.threads,
        "faiss_version": faiss.__version__,
        "build_s": round(t_built - t_read, 3),
        "train_s": build["train_s"],
        "add_s": build["add_s"],
        "tune_s": round(t_tuned - t_built, 3),
    }
    cache = Path(cfg.cache)
    with atomic_write(cache / INDEX_FILE) as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index, writer)
        del writer  # flushes faiss' buffer into `f` before the commit
    outs = [stat_out(cache, INDEX_FILE, f.size, f.digest, n)]
    size, digest = write_bytes_atomic(cache / INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    outs.append(stat_out(cache, INFO_FILE, size, digest))
    t_end = time.perf_counter()
    timings = {
        "total_s": round(t_end - t0, 3),
        "read_s": round(t_read - t0, 3),
        "build_s": info["build_s"],
        "tune_s": info["tune_s"],
    }
    extra = {
        "rows": n,
        "dim": dim,
        "factory": choice.factory,
        "nprobe": nprobe,
        "recall_at_k": info["recall_at_k"],
        "target_reached": info["target_reached"],
        "search": choice.method,
    }
    return commit_manifest(cache, spec, outs, timings, extra=extra)


def _is_ivf(index) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _to_gpus(index):
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:
        return index


@dataclass
class IndexResult:
    built: bool
    reason: str | None
    info: dict[str, Any]
    seconds: float


def run_index(
    config: IndexConfig,
    caption_outs: list[dict[str, Any]],
    n_vectors: int,
    dim: int,
    progress: ProgressFactory = null_progress,
    executor=None,
) -> IndexResult:
    """Plan and, if stale, build the index: in-process, or as one task on a Dask `executor`."""
    t0 = time.perf_counter()
    plan = plan_index(config, caption_outs, n_vectors, dim)
    clean_temp_files(Path(config.cache) / STAGE)
    if plan.task is not None:
        if executor is None or executor.name == "local":
            index_shard(plan.task, progress)
        else:  # the build's own progress bars stay on the worker
            executor.map(index_shard, [plan.task], gpu=True)
    return IndexResult(
        plan.task is not None, plan.reason, read_index_info(config.cache), time.perf_counter() - t0
    )


def read_index_info(cache: Path) -> dict[str, Any]:
    from manifests.errors import VERIFY_FIX, read_json

    try:
        return read_json(Path(cache) / INFO_FILE, VERIFY_FIX.format(cache=cache))
    except FileNotFoundError:
        return {}


def index_manifest(cache: Path) -> dict[str, Any] | None:
    return read_manifest(cache, STAGE, SHARD)
