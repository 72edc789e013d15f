"""Retrieve step 1 of 3: a caption corpus in, CLIP text features out, as `captions/{j:05d}.parquet`.

Corpus (read by pipeline/retrieve/corpus.py): `.txt` (one caption per line), `.jsonl`/`.ndjson`, `.csv`/`.tsv`
or `.parquet` (`--caption-column`), one file or many (globs, folders), each plain or gzip. Every caption is
whitespace-normalised; empty, non-UTF-8 and malformed records and exact duplicates (after normalisation)
are dropped and counted by reason.

Sharding and incremental reruns. The deduplicated corpus, in corpus order (arguments in the order given,
files of a glob or folder sorted by name, records in file order), is numbered 0, 1, 2, ...: that ordinal is
the `caption_id`, an int64 that is also the row id in the FAISS index, so `nbr_ids` join back to
`captions/*.parquet` directly. Shard j holds ids [j*S, (j+1)*S) for S = `--caption-shard-size`, and is
keyed on a digest of its first id and its texts. So:

- appending captions leaves every full shard's key unchanged (up to date); only the last, partial shard
  and the new shards run;
- a shard that must be remade first takes the vectors of texts its previous committed version already
  held (same CLIP identity), and encodes only the rest. Appending therefore encodes exactly the new
  captions, and inserting or deleting m captions in the middle encodes about m captions per later shard
  (each shard's texts shift by m), not whole shards;
- a corpus that shrinks has its surplus shards uncommitted (manifest first) and deleted.

Pure core: `plan_captions(config, clip)` reads the corpus and decides which shards run and why;
`captions_shard(task)` makes one and returns its manifest; `run_captions` does both in-process.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError
from feature_cache.executor import Progress  # (items just finished, reasons of those dropped)
from feature_cache.layout import captions_schema, shard_file
from feature_cache.runner import StageResult
from manifests import (
    Dep,
    ShardSpec,
    check_outputs,
    check_shard,
    commit_manifest,
    list_manifests,
    manifest_path,
    read_manifest,
    remove_stats,
    stat_out,
    write_json_atomic,
    write_parquet_atomic,
    write_stats,
)
from pipeline.retrieve.config import CaptionsConfig
from pipeline.retrieve.corpus import corpus_files, read_corpus
from storage import remote

STAGE = "captions"
STAGE_VERSION = "1"
CORPUS_FILE = f"{STAGE}/_corpus.json"  # what the last run read: files, counts by reason (not keyed)


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CaptionsTask:
    """One caption shard to (re)make; picklable so it can be shipped to a Dask worker."""

    config: CaptionsConfig
    spec: ShardSpec
    first_id: int  # caption_id of the first row
    texts: list[str]
    drops: dict[str, int]  # records dropped while this shard was being filled (for its stats)
    clip_model: str  # the embed stage's --clip-model / --clip-pretrained, to load the same CLIP
    clip_pretrained: str
    dim: int
    reason: str


@dataclass
class CaptionsPlan:
    tasks: list[CaptionsTask]
    up_to_date: list[int]
    n_shards: int
    n_captions: int  # unique captions = rows of all shards
    surplus: list[int]  # committed shards beyond the corpus' end (it shrank): removed by `run_captions`
    corpus: dict[str, Any]  # files, records read, drops by reason


def texts_digest(first_id: int, texts: list[str]) -> str:
    """Content digest of a shard's input: its first caption_id and its texts, in order."""
    h = hashlib.blake2b(f"{first_id}\n".encode(), digest_size=16)
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\n")  # normalised captions hold no newline, so this separator is unambiguous
    return h.hexdigest()


def keyed_params(identity: dict[str, str]) -> dict[str, Any]:
    return {"clip_model": identity["model"], "clip_weights": identity["weights"]}


def check_clip_agrees(cache: Path, clip, *, force: bool) -> None:
    """Refuse caption features made by a different CLIP (identity or dimension) than the embed stage's."""
    ours = (clip.identity["model"], clip.identity["weights"], clip.dim)
    for shard, m in sorted(list_manifests(cache, STAGE).items()):
        params = m.get("params", {})
        theirs = (params.get("clip_model"), params.get("clip_weights"), m.get("dim"))
        if theirs != ours and not force:
            raise ConfigError(
                f"--cache {cache}: captions/{shard:05d} holds text features from CLIP {theirs[0]} "
                f"({theirs[1]}, dim {theirs[2]}) but the embed stage's image embeddings come from "
                f"{ours[0]} ({ours[1]}, dim {ours[2]}); image and text features must share one CLIP. "
                "Rerun with --force to re-encode the captions with the embed stage's CLIP"
            )


def plan_captions(config: CaptionsConfig, clip) -> CaptionsPlan:
    """Read and deduplicate the corpus, cut it into shards, and find the shards that must be (re)made.

    `clip` is the embed stage's `EmbeddedClip`. Memory: every unique caption is held once (for the
    duplicate check), and the texts of the shards that will run.
    """
    from core.clip import clip_identity

    config.validate()
    current = clip_identity(clip.clip_model, clip.clip_pretrained)
    if current != clip.identity:
        raise ConfigError(
            f"--cache {config.cache}: the CLIP the embed stage recorded ({clip.clip_model!r}, "
            f"{clip.clip_pretrained!r}) now resolves to {current}, not {clip.identity}: its config or "
            "checkpoint file changed since embedding; rerun `pipeline embed` first"
        )
    check_clip_agrees(config.cache, clip, force=config.force)
    files = corpus_files(config.corpus)
    params = keyed_params(clip.identity)
    unkeyed = {
        "caption_column": config.caption_column,
        "shard_size": config.shard_size,
        "batch_size": config.batch_size,
        "device": config.device,
    }
    seen: set[str] = set()
    drops: Counter = Counter()
    shard_drops: Counter = Counter()
    tasks: list[CaptionsTask] = []
    up_to_date: list[int] = []
    buffer: list[str] = []
    records = 0
    n_shards = 0

    def close_shard() -> None:
        nonlocal buffer, shard_drops, n_shards
        shard, first_id = n_shards, n_shards * config.shard_size
        deps = [Dep(f"texts:{first_id}-{first_id + len(buffer) - 1}", texts_digest(first_id, buffer))]
        spec = ShardSpec(STAGE, shard, STAGE_VERSION, params, deps, unkeyed)
        reason = "forced" if config.force else check_shard(config.cache, spec)
        if reason is None:
            up_to_date.append(shard)
        else:
            tasks.append(
                CaptionsTask(
                    config,
                    spec,
                    first_id,
                    buffer,
                    dict(shard_drops),
                    clip.clip_model,
                    clip.clip_pretrained,
                    clip.dim,
                    reason,
                )
            )
        buffer, shard_drops, n_shards = [], Counter(), n_shards + 1

    for text, reason in read_corpus(files, config.caption_column):
        records += 1
        if text is not None and text in seen:
            reason = "duplicate"
        if reason is not None:
            drops[reason] += 1
            shard_drops[reason] += 1
            continue
        seen.add(text)
        buffer.append(text)
        if len(buffer) == config.shard_size:
            close_shard()
    if buffer:
        close_shard()
    elif shard_drops and tasks and tasks[-1].spec.shard == n_shards - 1:
        tasks[-1].drops = dict(Counter(tasks[-1].drops) + shard_drops)  # trailing drops: the last shard's
    n_captions = len(seen)
    if n_captions == 0:
        raise ConfigError(
            f"--captions {' '.join(config.corpus)}: no usable captions ({records:,} records read; "
            f"{_describe(drops)}); check the files and --caption-column"
        )
    surplus = sorted(s for s in list_manifests(config.cache, STAGE) if s >= n_shards)
    corpus = {
        "files": files,
        # size + mtime (an object's fingerprint) of each corpus file by resolved path: lets `pipeline
        # status` judge the corpus without reading it, however its path is spelled
        "file_digests": {p: remote.digest_input(p, p) for p in files},
        "records": records,
        "unique_captions": n_captions,
        "dropped": dict(sorted(drops.items())),
        "shards": n_shards,
        "shard_size": config.shard_size,
    }
    return CaptionsPlan(tasks, up_to_date, n_shards, n_captions, surplus, corpus)


def _describe(drops: Counter | dict) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in sorted(drops.items())) or "none dropped"


# ---------------------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------------------


def read_caption_shard(path: Path, columns: list[str] | None = None) -> dict[str, Any]:
    """`{"caption_id": int64[n], "text": list[str], "txt_emb": float16[n, D]}` (only the columns asked)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns)
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name == "txt_emb":
            dim = col.type.list_size
            out[name] = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        elif name == "caption_id":
            out[name] = col.to_numpy()
        else:
            out[name] = col.to_pylist()
    return out


def _reusable(cache: Path, shard: int, params: dict[str, Any], dim: int) -> dict[str, np.ndarray]:
    """Text -> vector from the shard's previous committed version, when the same CLIP made it."""
    manifest = read_manifest(cache, STAGE, shard)
    if manifest is None or manifest.get("params") != params or manifest.get("dim") != dim:
        return {}
    if check_outputs(cache, manifest) is not None:
        return {}
    old = read_caption_shard(Path(cache) / shard_file(STAGE, shard), ["text", "txt_emb"])
    return dict(zip(old["text"], old["txt_emb"], strict=True))


def count_truncated(tokenizer, texts: list[str], context_length: int) -> int:
    """Captions longer than the CLIP context (start and end tokens included): CLIP sees only their head."""
    if hasattr(tokenizer, "encode") and getattr(tokenizer, "reduction_fn", None) is None:
        return sum(len(tokenizer.encode(t)) + 2 > context_length for t in texts)
    # Other tokenizers: a caption that fills the whole context was (or was about to be) truncated.
    tokens = tokenizer(texts)
    return int((tokens[:, -1] != 0).sum())


def captions_shard(task: CaptionsTask, progress: Progress | None = None) -> dict[str, Any]:
    """Encode one caption shard (reusing the vectors its previous version held) and commit it."""
    import pyarrow as pa
    import torch

    from core.clip import cached_clip, encode_texts

    cfg, spec = task.config, task.spec
    t0 = time.perf_counter()
    bundle = cached_clip(task.clip_model, task.clip_pretrained, cfg.device)
    if keyed_params(bundle.identity) != spec.params or bundle.dim != task.dim:
        raise ConfigError(
            f"--cache {cfg.cache}: the loaded CLIP {bundle.identity} (dim {bundle.dim}) is not the embed "
            "stage's; rerun `pipeline embed`"
        )
    t_model = time.perf_counter()
    n, dim = len(task.texts), bundle.dim
    # --force means re-encode: reuse only serves ordinary reruns (appends, shifted shards).
    reuse = {} if task.reason == "forced" else _reusable(cfg.cache, spec.shard, spec.params, dim)
    txt_emb = np.zeros((n, dim), np.float16)
    todo = []
    for row, text in enumerate(task.texts):
        vec = reuse.get(text)
        if vec is None:
            todo.append(row)
        else:
            txt_emb[row] = vec
    if progress and n - len(todo):
        progress(n - len(todo), [])
    del reuse
    t_encode, non_finite = 0.0, 0
    for start in range(0, len(todo), cfg.batch_size):
        rows = todo[start : start + cfg.batch_size]
        t = time.perf_counter()
        emb = encode_texts(bundle, [task.texts[r] for r in rows]).to(torch.float16).cpu().numpy()
        t_encode += time.perf_counter() - t
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():  # kept as a zero vector: caption_ids stay contiguous and it never wins a search
            non_finite += int(bad.sum())
            emb[bad] = 0
        txt_emb[rows] = emb
        if progress:
            progress(len(rows), ["non_finite_embedding"] * int(bad.sum()))
    # The shard's own count (its stats describe what it holds), and the count among the captions this run
    # encoded: a run's summary reports its own work, not a long caption reused from before.
    truncated = count_truncated(bundle.tokenizer, task.texts, bundle.context_length)
    encoded_truncated = truncated
    if truncated and len(todo) < n:
        encoded = [task.texts[r] for r in todo]
        encoded_truncated = count_truncated(bundle.tokenizer, encoded, bundle.context_length)

    schema = captions_schema(dim)
    ids = np.arange(task.first_id, task.first_id + n, dtype=np.int64)
    table = pa.table(
        {
            "caption_id": pa.array(ids, pa.int64()),
            "text": pa.array(task.texts, pa.string()),
            "txt_emb": pa.FixedSizeListArray.from_arrays(pa.array(txt_emb.reshape(-1), pa.float16()), dim),
        },
        schema=schema,
    )
    rel = shard_file(STAGE, spec.shard)
    size, digest = write_parquet_atomic(Path(cfg.cache) / rel, table)
    t_end = time.perf_counter()
    timings = {
        "total_s": round(t_end - t0, 4),
        "load_model_s": round(t_model - t0, 4),
        "encode_s": round(t_encode, 4),
        "captions_per_s": round(len(todo) / max(t_encode, 1e-9), 2) if todo else 0.0,
    }
    stats = {
        "shard": spec.shard,
        "rows": n,
        "first_caption_id": task.first_id,
        "encoded": len(todo),
        "reused": n - len(todo),
        "truncated": truncated,
        "encoded_truncated": encoded_truncated,
        "context_length": bundle.context_length,
        "non_finite_embedding": non_finite,
        "dropped_while_reading": dict(sorted(task.drops.items())),
        "reason": task.reason,
        "timings": timings,
    }
    write_stats(cfg.cache, STAGE, spec.shard, stats)
    extra = {
        "rows": n,
        "dim": dim,
        "first_caption_id": task.first_id,
        "encoded": len(todo),
        "truncated": truncated,
        "encoded_truncated": encoded_truncated,
    }
    return commit_manifest(cfg.cache, spec, [stat_out(cfg.cache, rel, size, digest, n)], timings, extra=extra)


def remove_surplus(cache: Path, shards: list[int]) -> None:
    """Uncommit (manifest first), then delete, shards beyond the end of a corpus that shrank."""
    for shard in shards:
        manifest_path(cache, STAGE, shard).unlink(missing_ok=True)
        (Path(cache) / shard_file(STAGE, shard)).unlink(missing_ok=True)
        remove_stats(cache, STAGE, shard)


def run_captions(
    config: CaptionsConfig,
    clip,
    plan: CaptionsPlan | None = None,
    progress: Progress | None = None,
    executor=None,
) -> StageResult:
    """Plan (unless given), then make every stale shard, in-process or on `executor` (feature_cache.executor).
    Its summary: the corpus's unique captions (`n_captions`), those encoded by CLIP this run (`encoded`,
    `truncated` among them, not the reused ones) and what the corpus read found (`corpus`: files,
    records, drops)."""
    from feature_cache.runner import run_shards

    t0 = time.perf_counter()
    plan = plan or plan_captions(config, clip)
    stage_dir = Path(config.cache) / STAGE
    remove_surplus(config.cache, plan.surplus)
    run = run_shards(
        config.cache,
        STAGE,
        plan.tasks,
        captions_shard,
        up_to_date=plan.up_to_date,
        executor=executor,
        progress=progress,
    )
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(config.cache) / CORPUS_FILE, plan.corpus)
    run.shards_total = plan.n_shards
    run.dropped = dict(plan.corpus["dropped"])  # the corpus is read whole on every run
    run.summary = {
        "n_captions": plan.n_captions,
        "encoded": sum(m["encoded"] for m in run.manifests),
        "truncated": sum(m["encoded_truncated"] for m in run.manifests),
        "corpus": plan.corpus,
    }
    run.seconds = time.perf_counter() - t0
    return run


def caption_shard_outputs(cache: Path, n_shards: int) -> list[dict[str, Any]] | None:
    """The committed parquet `out` (path, digest, rows) of shards 0..n-1, or None if any is missing."""
    manifests = list_manifests(cache, STAGE)
    outs = []
    for shard in range(n_shards):
        m = manifests.get(shard)
        if m is None or check_outputs(cache, m) is not None:
            return None
        out = dict(m["outs"][0])
        out["first_caption_id"] = m["first_caption_id"]
        out["dim"] = m["dim"]
        outs.append(out)
    return outs
