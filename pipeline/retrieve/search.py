"""The search step of `pipeline retrieve`: one task per embed shard i -> `retrieve/{i:05d}.parquet`.

Each task queries the caption index (`index/captions.faiss`, pipeline/retrieve/index.py), or an exact chunked
matmul over the caption features (`--index gpu-flat`), with the shard's image embeddings, and writes
`key`, `nbr_ids` fixed_size_list<int64>[k] and `nbr_sims` fixed_size_list<float32>[k], best first, in
the embed sidecar's key order, plus `retrieve/_stats/{i:05d}.json`. Keyed on k and the search method;
deps = the embed shard's Parquet output digest + the index file's digest.

Quality check (labelled data): when the embed sidecar carries attribute labels, the stats report the
attribute precision of the retrieved captions (`score_attributes`; the definition is
world/attribute_precision.py's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError
from feature_cache.executor import Progress  # (items just finished, reasons of those dropped)
from feature_cache.layout import retrieve_schema, shard_file, shard_out
from manifests import (
    Dep,
    ShardSpec,
    check_outputs,
    check_shard,
    commit_manifest,
    list_manifests,
    stat_out,
    write_parquet_atomic,
    write_stats,
)
from pipeline.retrieve.config import SearchConfig
from pipeline.retrieve.faiss_index import human_bytes, set_nprobe, topk_matmul
from pipeline.retrieve.index import INDEX_FILE, index_manifest, read_embeddings
from world.attribute_precision import ATTRIBUTES, DEFINITION, attribute_precision, target_object

STAGE = "retrieve"
STAGE_VERSION = "1"


class FaissSearcher:
    """The committed FAISS index (moved to every GPU when faiss-gpu sees one)."""

    def __init__(self, path: Path, threads: int):
        import faiss

        from pipeline.retrieve.faiss_index import faiss_gpus

        faiss.omp_set_num_threads(threads)
        cpu_index = faiss.read_index(str(path))
        try:
            self.nlist = int(faiss.extract_index_ivf(cpu_index).nlist)
            self.nprobe = int(faiss.extract_index_ivf(cpu_index).nprobe)
        except RuntimeError:
            self.nlist = self.nprobe = 0
        self.index, self.gpus = cpu_index, 0
        if faiss_gpus() > 0:
            try:
                self.index, self.gpus = faiss.index_cpu_to_all_gpus(cpu_index), faiss_gpus()
            except RuntimeError:
                pass  # not every index type has a GPU version: stay on the CPU
        self.ntotal = int(cpu_index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        missing = (ids < 0).any(axis=1)
        nprobe = self.nprobe
        # An IVF probe can hold fewer than k vectors in all: widen it for those rows until k are found.
        while missing.any() and 0 < nprobe < self.nlist:
            nprobe = min(2 * nprobe, self.nlist)
            set_nprobe(self.index, nprobe)
            rows = np.flatnonzero(missing)
            sims[rows], ids[rows] = self.index.search(np.ascontiguousarray(queries[rows], np.float32), k)
            missing = (ids < 0).any(axis=1)
        if nprobe != self.nprobe:
            set_nprobe(self.index, self.nprobe)
        return sims, ids


class MatmulSearcher:
    """Exact top-k by chunked matmul (`topk_matmul`): fp16 on CUDA, fp32 on the CPU."""

    def __init__(self, db: np.ndarray, device: str = "cuda"):
        import torch

        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        need = db.shape[0] * db.shape[1] * (2 if dtype == torch.float16 else 4)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > 0.8 * free:
                raise ConfigError(
                    f"--index gpu-flat: the corpus ({db.shape[0]:,} x {db.shape[1]} fp16 = "
                    f"{human_bytes(need)}) does not fit in the GPU's free memory ({human_bytes(free)}); "
                    "use --index auto"
                )
        self.db = torch.from_numpy(np.ascontiguousarray(db)).to(self.device, dtype)
        self.ntotal = db.shape[0]

    @classmethod
    def from_index_file(cls, path: Path, device: str = "cuda") -> MatmulSearcher:
        import faiss

        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexFlat):
            raise ConfigError(f"{path} is not a Flat index; rebuild it with --index gpu-flat --force")
        db = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        return cls(db.copy(), device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        sims, ids = topk_matmul(self.db, torch.from_numpy(np.ascontiguousarray(queries, np.float32)), k)
        return sims.cpu().numpy(), ids.cpu().numpy()


_SEARCHER: dict[tuple, Any] = {}


def cached_searcher(config: SearchConfig, index_digest: str):
    """One loaded index per process (a Dask worker keeps it across the shards it searches)."""
    key = (str(config.cache), index_digest, config.method, config.matmul_device, config.threads)
    if key not in _SEARCHER:
        _SEARCHER.clear()
        path = Path(config.cache) / INDEX_FILE
        if config.gpu_flat:
            _SEARCHER[key] = MatmulSearcher.from_index_file(path, config.matmul_device)
        else:
            _SEARCHER[key] = FaissSearcher(path, config.threads)
    return _SEARCHER[key]


def search_batched(
    searcher, queries: np.ndarray, k: int, batch_size: int, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    sims = np.zeros((len(queries), k), np.float32)
    ids = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(queries), batch_size):
        stop = start + batch_size
        sims[start:stop], ids[start:stop] = searcher.search(queries[start:stop], k)
        if progress:
            progress(len(queries[start:stop]), [])
    return sims, ids


def score_attributes(labels: list[str | None], nbr_texts: list[list[str]]) -> dict[str, Any] | None:
    """Attribute precision@1 and @k of retrieved captions against the images' labels.

    The definition is `world.attribute_precision`'s (recorded in the stats as `scoring`): precision@1
    scores the top caption, precision@k every one of the k (each image weighs the same, k captions each).
    `labels`: the embed sidecar's `labels` json per image (None where absent); `nbr_texts`: the retrieved
    caption texts per image, best first. None when no image carries object labels.
    """
    from world.attribute_precision import caption_objects

    parsed: dict[str, list[dict[str, str]]] = {}

    def objects(text: str) -> list[dict[str, str]]:
        if text not in parsed:
            parsed[text] = caption_objects(text)
        return parsed[text]

    scored = [
        (target, texts)
        for label, texts in zip(labels, nbr_texts, strict=True)
        if (target := target_object(label)) is not None and texts
    ]
    if not scored:
        return None
    at_1 = attribute_precision((target, objects(texts[0])) for target, texts in scored)
    at_k = attribute_precision((target, objects(text)) for target, texts in scored for text in texts)
    figures = (*ATTRIBUTES, "object", "mean")
    return {
        "n_scored": len(scored),
        "k": len(scored[-1][1]),
        "precision_at_1": {name: at_1[name] for name in figures},
        "precision_at_k": {name: at_k[name] for name in figures},
        "scoring": f"{DEFINITION}; precision@1: the top caption, precision@k: all k of every image",
    }


_TEXTS: dict[tuple, Any] = {}


def caption_texts(cache: Path, index_deps: list[dict[str, str]]):
    """All caption texts the index was built from, as one pyarrow array indexed by caption_id (cached)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = (str(cache), tuple(d["digest"] for d in index_deps))
    if key not in _TEXTS:
        _TEXTS.clear()
        chunks = [pq.read_table(Path(cache) / d["name"], columns=["text"]).column(0) for d in index_deps]
        _TEXTS[key] = pa.chunked_array([c for chunked in chunks for c in chunked.chunks], pa.string())
    return _TEXTS[key]


@dataclass
class SearchTask:
    config: SearchConfig
    spec: ShardSpec
    embed_parquet: str  # relative to the cache
    index_digest: str
    index_deps: list[dict[str, str]]  # caption shards behind the index (for caption texts)
    reason: str


@dataclass
class SearchPlan:
    tasks: list[SearchTask]
    up_to_date: list[int]


def _embed_parquet_out(cache: Path, shard: int, manifest: dict[str, Any]) -> dict[str, Any]:
    reason = check_outputs(cache, manifest)
    if reason is not None:
        raise ConfigError(
            f"--cache {cache}: embed shard {shard} is not intact ({reason}); rerun `pipeline embed`"
        )
    out = shard_out(manifest)
    if out is not None:
        return out
    raise ConfigError(f"--cache {cache}: embed shard {shard} has no Parquet sidecar; rerun `pipeline embed`")


def plan_search(config: SearchConfig) -> SearchPlan:
    """One task per embed shard that is stale against the committed index."""
    config.validate()
    embed = list_manifests(config.cache, "embed")
    manifest = index_manifest(config.cache)
    if manifest is None or check_outputs(config.cache, manifest) is not None:
        raise ConfigError(
            f"--cache {config.cache}: no committed caption index; run `pipeline retrieve` without "
            "--dry-run to build it"
        )
    index_out = next(o for o in manifest["outs"] if o["path"] == INDEX_FILE)
    tasks, up_to_date = [], []
    unkeyed = {"batch_size": config.batch_size, "threads": config.threads}
    for shard, m in sorted(embed.items()):
        out = _embed_parquet_out(config.cache, shard, m)
        deps = [Dep(out["path"], out["digest"]), Dep(INDEX_FILE, index_out["digest"])]
        spec = ShardSpec(STAGE, shard, STAGE_VERSION, config.keyed_params(), deps, unkeyed)
        reason = "forced" if config.force else check_shard(config.cache, spec)
        if reason is None:
            up_to_date.append(shard)
        else:
            tasks.append(SearchTask(config, spec, out["path"], index_out["digest"], manifest["deps"], reason))
    return SearchPlan(tasks, up_to_date)


def search_shard(task: SearchTask, progress: Progress | None = None) -> dict[str, Any]:
    """Search one embed shard's images and commit `retrieve/{i:05d}.parquet` + stats; returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, spec = task.config, task.spec
    cache = Path(cfg.cache)
    t0 = time.perf_counter()
    sidecar = pq.read_table(cache / task.embed_parquet, columns=["key", "labels"])
    keys = sidecar.column("key").to_pylist()
    queries = read_embeddings(cache / task.embed_parquet).astype(np.float32)
    searcher = cached_searcher(cfg, task.index_digest)
    if cfg.k > searcher.ntotal:
        raise ConfigError(f"--k {cfg.k} is larger than the caption corpus ({searcher.ntotal:,} captions)")
    t_load = time.perf_counter()
    sims, ids = search_batched(searcher, queries, cfg.k, cfg.batch_size, progress)
    t_search = time.perf_counter()

    schema = retrieve_schema(cfg.k)
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "nbr_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int64()), cfg.k),
            "nbr_sims": pa.FixedSizeListArray.from_arrays(pa.array(sims.reshape(-1), pa.float32()), cfg.k),
        },
        schema=schema,
    )
    rel = shard_file(STAGE, spec.shard)
    size, digest = write_parquet_atomic(cache / rel, table)

    labels = sidecar.column("labels").to_pylist()
    precision = None
    if any(labels):
        texts = caption_texts(cache, task.index_deps)
        flat = texts.take(pa.array(ids.reshape(-1))).to_pylist()
        nbr_texts = [flat[i * cfg.k : (i + 1) * cfg.k] for i in range(len(keys))]
        precision = score_attributes(labels, nbr_texts)
    t_end = time.perf_counter()
    timings = {
        "total_s": round(t_end - t0, 4),
        "load_s": round(t_load - t0, 4),
        "search_s": round(t_search - t_load, 4),
        "queries_per_s": round(len(keys) / max(t_search - t_load, 1e-9), 1),
    }
    stats = {
        "shard": spec.shard,
        "rows": len(keys),
        "k": cfg.k,
        "method": cfg.method,
        "mean_sim_at_1": round(float(sims[:, 0].mean()), 4) if len(keys) else None,
        "mean_sim_at_k": round(float(sims.mean()), 4) if len(keys) else None,
        "unique_captions_retrieved": int(len(np.unique(ids))),
        "precision": precision,
        "reason": task.reason,
        "timings": timings,
    }
    write_stats(cache, STAGE, spec.shard, stats)
    extra = {
        "rows": len(keys),
        "k": cfg.k,
        "precision": precision
        and {
            "n_scored": precision["n_scored"],
            "at_1": precision["precision_at_1"],
            "at_k": precision["precision_at_k"],
        },
    }
    return commit_manifest(cache, spec, [stat_out(cache, rel, size, digest, len(keys))], timings, extra=extra)
