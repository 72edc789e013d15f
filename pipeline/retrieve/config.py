"""`pipeline retrieve`'s config: one config per step (captions, index, search), their defaults and checks,
which of them are keyed, and how the command's options set them (`RetrieveConfig.from_options`). The steps
are pipeline/retrieve/captions.py, pipeline/retrieve/index.py and pipeline/retrieve/search.py;
pipeline/retrieve/stage.py runs them.

Light on purpose: `pipeline retrieve`'s signature reads its defaults from these configs when cli/pipeline.py
is imported, before the root callback sets the thread count (core.processes.start_threads) and for
every command, so nothing here may import numpy, faiss or torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError

AUTO, GPU_FLAT = "auto", "gpu-flat"  # --index: chosen by corpus size; exact fp16 matmul top-k on a GPU


def _all_cpus() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class CaptionsConfig:
    corpus: tuple[str, ...]  # --captions: files, folders or globs (.txt .jsonl .csv .tsv .parquet, [.gz])
    cache: Path = Path("cache")  # the feature cache (must hold an embed stage: its CLIP encodes the texts)
    caption_column: str = "caption"  # the text column of .jsonl/.csv/.tsv/.parquet files
    shard_size: int = 100_000  # captions per shard (changing it re-keys every shard; vectors are reused)
    batch_size: int = 1024  # captions per CLIP forward pass (not keyed: does not change the output)
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda", "cuda:1"
    force: bool = False  # re-encode every shard, and accept captions made by another CLIP

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError(
                "give the caption corpus with --captions PATH (a .txt, .jsonl, .csv, .tsv or "
                ".parquet file, a folder or a glob)"
            )
        if not self.caption_column:
            raise ConfigError("--caption-column must not be empty")
        if self.shard_size < 1:
            raise ConfigError("--caption-shard-size must be at least 1")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


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
    threads: int = field(default_factory=_all_cpus)  # faiss OpenMP threads
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


@dataclass(frozen=True)
class SearchConfig:
    cache: Path = Path("cache")  # the feature cache
    k: int = IndexConfig.k  # captions retrieved per image (the index's k: RetrieveConfig.validate)
    gpu_flat: bool = False  # exact chunked matmul top-k in torch instead of the FAISS index
    matmul_device: str = "cuda"  # device of that matmul: fp16 on CUDA; "cpu" runs it in fp32 (tests)
    batch_size: int = 16_384  # queries per search call (not keyed)
    threads: int = field(default_factory=_all_cpus)  # faiss OpenMP threads
    force: bool = False  # remake every shard even when up to date

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError("--k must be at least 1")
        if self.batch_size < 1:
            raise ConfigError("--query-batch-size must be at least 1")
        if self.gpu_flat and self.matmul_device.startswith("cuda"):
            require_cuda("--index gpu-flat")

    @property
    def method(self) -> str:
        """Keyed: fp16 and fp32 matmul differ in the last bits of `nbr_sims` and may swap exact ties."""
        if not self.gpu_flat:
            return "faiss"
        return "matmul-fp16" if self.matmul_device.startswith("cuda") else "matmul-fp32"

    def keyed_params(self) -> dict[str, Any]:
        return {"k": self.k, "method": self.method}


# Each `pipeline retrieve` option -> the (step, field)s it sets; a field no option sets keeps its default.
OPTION_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "cache": (("captions", "cache"), ("index", "cache"), ("search", "cache")),
    "caption_column": (("captions", "caption_column"),),
    "caption_shard_size": (("captions", "shard_size"),),
    "batch_size": (("captions", "batch_size"),),
    "device": (("captions", "device"),),
    "index": (("index", "index"),),
    "k": (("index", "k"), ("search", "k")),
    "target_recall": (("index", "target_recall"),),
    "max_index_memory": (("index", "max_index_memory"),),
    "query_batch_size": (("search", "batch_size"),),
    "force": (("captions", "force"), ("index", "force"), ("search", "force")),
}


@dataclass(frozen=True)
class RetrieveConfig:
    """The whole stage: one config per step (each validates its own flags)."""

    captions: CaptionsConfig
    index: IndexConfig
    search: SearchConfig

    @classmethod
    def from_options(cls, *, captions: Sequence[str], **options: Any) -> RetrieveConfig:
        """Build from the `pipeline retrieve` options given (OPTION_FIELDS, one keyword each; None: not
        given), each step config's defaults supplying the rest."""
        unknown = sorted(set(options) - set(OPTION_FIELDS))
        if unknown:
            raise TypeError(f"RetrieveConfig.from_options: unknown option(s) {', '.join(unknown)}")
        given = {name: value for name, value in options.items() if value is not None}
        if "cache" in given:
            given["cache"] = Path(given["cache"])
        if "max_index_memory" in given:
            given["max_index_memory"] = parse_size(given["max_index_memory"])
        steps: dict[str, dict[str, Any]] = {
            "captions": {"corpus": tuple(str(c) for c in captions)},
            "index": {},
            "search": {"gpu_flat": given.get("index") == GPU_FLAT},
        }
        for option, value in given.items():
            for step, name in OPTION_FIELDS[option]:
                steps[step][name] = value
        return cls(
            CaptionsConfig(**steps["captions"]),
            IndexConfig(**steps["index"]),
            SearchConfig(**steps["search"]),
        )

    def validate(self) -> None:
        self.captions.validate()
        self.index.validate()
        self.search.validate()
        if not (self.captions.cache == self.index.cache == self.search.cache):
            raise ConfigError("the three retrieve steps must share one --cache")
        if self.index.k != self.search.k:
            raise ConfigError("--k must be the same for the index (nprobe tuning) and the search")


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
