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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError
from core.progress import null_progress
from feature_cache.executor import ProgressFactory
from feature_cache.layout import shard_file
from feature_cache.runner import StageResult
from manifests import (
    Dep,
    ShardSpec,
    atomic_write,
    check_shard,
    commit_manifest,
    list_manifests,
    read_manifest,
    stat_out,
    write_bytes_atomic,
)
from pipeline.retrieve.config import GPU_FLAT, IndexConfig
from pipeline.retrieve.faiss_index import (
    IndexChoice,
    build_faiss_index,
    choose_index,
    exact_search,
    faiss_gpus,
    is_ivf,
    recall_at_k,
    set_nprobe,
    to_gpus,
    topk_matmul,
    train_sample_ids,
    train_size,
    tune_nprobe,
)

STAGE = "index"
STAGE_VERSION = "1"
SHARD = 0  # a single task
INDEX_FILE = f"{STAGE}/captions.faiss"
INFO_FILE = f"{STAGE}/index.json"


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


def index_shard(task: IndexTask, progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Build, tune, measure and commit the index; returns its manifest."""
    import faiss

    progress = progress or null_progress
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
    elif is_ivf(index):
        with progress("index: tune nprobe", total=None, unit="probe") as advance:
            searchable = to_gpus(index) if build["gpus"] else index
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


def run_index(
    config: IndexConfig,
    caption_outs: list[dict[str, Any]],
    n_vectors: int,
    dim: int,
    progress: ProgressFactory = null_progress,
    executor=None,
) -> StageResult:
    """Plan and, if stale, build the index: in-process, or as one task on a Dask `executor`. Its one shard
    is run (built) or up to date; its summary is the index's info (`read_index_info`)."""
    from feature_cache.runner import run_shards

    t0 = time.perf_counter()
    plan = plan_index(config, caption_outs, n_vectors, dim)
    tasks = [plan.task] if plan.task is not None else []
    local = executor is None or executor.name == "local"
    # the build's bars (a progress factory) draw in this process only: on Dask they stay on the worker
    run = run_shards(
        config.cache,
        STAGE,
        tasks,
        index_shard,
        up_to_date=[] if tasks else [SHARD],
        executor=executor,
        progress=progress if local else None,
    )
    run.rows_written = n_vectors if tasks else 0  # the vectors indexed
    run.summary = read_index_info(config.cache)
    run.seconds = time.perf_counter() - t0
    return run


def read_index_info(cache: Path) -> dict[str, Any]:
    from manifests.errors import VERIFY_FIX, read_json

    try:
        return read_json(Path(cache) / INFO_FILE, VERIFY_FIX.format(cache=cache))
    except FileNotFoundError:
        return {}


def index_manifest(cache: Path) -> dict[str, Any] | None:
    return read_manifest(cache, STAGE, SHARD)
