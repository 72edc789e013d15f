"""Reading a cache's committed outputs, as the trainers do: what a stage committed, opened once.

Only committed shards are read: a stage output counts when its manifest exists and its file size matches
the manifest's `outs` (a shard being rewritten does not). Each file is opened once, checked with `fstat`
and then read through that descriptor, so a later rewrite of the path (the pipeline commits with
`os.replace`) cannot change what a run reads. Nothing in the pipeline-owned directories is ever written.
A Parquet output whose bytes differ from the manifest's digest (bit rot) or that does not decode is an
`Unreadable` naming the file and `pipeline run --verify`.

Shards a condition reads that cannot be used now (being rewritten, stale, not made yet) are a
`PartialCache` naming them and the command that makes them (trainers.data.loader waits for them, or trains on
the rest with --allow-partial). A file of another size than its manifest's is named with both sizes, and
`pipeline run --verify` offered: still so after the wait, it was most likely truncated, not rewritten.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from feature_cache.steps import command as stage_command
from manifests import Dep, check_outputs, digest_bytes, list_manifests, read_manifest
from manifests.errors import VERIFY_FIX, damaged

SIZE_DIFFERS = "file size differs from the manifest's"


def _describe(skipped: dict[int, str]) -> str:
    by_reason = Counter(skipped.values())
    return "; ".join(
        f"{reason} ({', '.join(str(s) for s, r in sorted(skipped.items()) if r == reason)[:60]})"
        for reason in by_reason
    )


def describe_skipped(skipped: dict[str, dict[int, str]]) -> str:
    """stage -> shard -> reason, as `optimize shards: not made yet (1, 2); ...`."""
    return "; ".join(f"{stage} shards: {_describe(s)}" for stage, s in skipped.items())


class PartialCache(ConfigError):
    """Shards a condition reads that cannot be used now: being rewritten, stale, or not made yet."""

    def __init__(
        self,
        cache: Path,
        skipped: dict[str, dict[int, str]],
        waited: float | None = None,
        rest: bool = True,  # whether the other shards could be trained on (--allow-partial)
    ):
        self.skipped = skipped  # stage -> shard -> reason
        after = f" after waiting {waited:.3g} s for them to be committed" if waited is not None else ""
        runs = " or ".join(f"`{stage_command(stage, cache)}`" for stage in skipped)
        partial = (
            ", or pass --allow-partial to train on the rest (the run's config.json records the rows used)"
            if rest
            else " (no other shard is usable, so --allow-partial cannot help)"
        )
        described, faults = _file_faults(cache, skipped)
        named = verify = ""
        if faults:  # a file of another size first: it may be damaged, not being rewritten
            reason, detail = next((f for f in faults if f[0] == SIZE_DIFFERS), faults[0])
            named = f" {detail}" + (f" (and {len(faults) - 1} more files)" if len(faults) > 1 else "") + "."
            if reason == SIZE_DIFFERS:
                verify = f". If no stage is running, the file is damaged: {VERIFY_FIX.format(cache=cache)}"
        super().__init__(
            f"--cache {cache}: part of the cache is not usable{after}: {describe_skipped(described)}.{named} "
            f"Wait for the running stage to commit them or rerun it ({runs}){partial}{verify}"
        )


def _output_fault(cache: Path, out: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, the file and what is wrong with it) when a committed output's file is missing or its size
    differs from the manifest's (being rewritten, or truncated); None when it matches."""
    path = Path(cache) / out["path"]
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "file missing", f"{path} is missing"
    if size != out["size"]:
        return SIZE_DIFFERS, f"{path} is {size:,} bytes where its manifest says {out['size']:,}"
    return None


def _file_faults(
    cache: Path, skipped: dict[str, dict[int, str]]
) -> tuple[dict[str, dict[int, str]], list[tuple[str, str]]]:
    """`skipped` with each shard whose committed files are missing or of another size saying which (the
    readers only learn that a file could not be opened as committed), and every such file's fault."""
    described: dict[str, dict[int, str]] = {}
    faults: list[tuple[str, str]] = []
    for stage, shards in skipped.items():
        described[stage] = dict(shards)
        for shard in shards:
            outs = (read_manifest(cache, stage, shard) or {}).get("outs", [])
            found = [fault for out in outs if (fault := _output_fault(cache, out))]
            if found:
                described[stage][shard] = found[0][0]
                faults += found
    return described, faults


def open_committed(cache: Path, out: dict[str, Any]) -> int | None:
    """An fd on the committed file, or None when it is missing or its size differs from the manifest's
    (a shard being rewritten). Reading through the fd keeps this version even if the path is replaced."""
    try:
        fd = os.open(Path(cache) / out["path"], os.O_RDONLY)
    except FileNotFoundError:
        return None
    if os.fstat(fd).st_size != out["size"]:
        os.close(fd)
        return None
    return fd


def read_parquet_committed(cache: Path, out: dict[str, Any], columns: list[str] | None = None):
    """A pyarrow Table of a committed Parquet output, or None (see `open_committed`). Bytes that differ
    from the manifest's digest or do not decode (bit rot: size and mtime unchanged) are `damaged`.

    Hashing costs about 1 s per GB (blake2b), small next to decoding: most flipped bytes in a Parquet file
    (the float columns) decode without an error into different numbers, so the digest is the only check."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fd = open_committed(cache, out)
    if fd is None:
        return None
    path = Path(cache) / out["path"]
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    if out.get("digest") and digest_bytes(data) != out["digest"]:
        raise damaged(path, ValueError("its content digest differs from its manifest's"), cache)
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise damaged(path, e, cache) from e


def raise_fd_limit(needed: int) -> None:
    """One fd per embed tar is held for the run; lift the soft limit towards the hard one if needed."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def caption_deps(cache: Path) -> tuple[Dep, ...]:
    """The committed caption feature shards, as (path, output digest) deps, in path order."""
    deps = []
    for manifest in list_manifests(cache, "captions").values():
        reason = check_outputs(cache, manifest)
        if reason is not None:
            raise ConfigError(f"--cache {cache}: caption features: {reason}; rerun `pipeline retrieve`")
        for out in manifest.get("outs", []):
            if out["path"].endswith(".parquet"):
                deps.append(Dep(out["path"], out["digest"]))
    if not deps:
        raise ConfigError(
            f"--cache {cache}: no caption features (captions/*.parquet); run `pipeline retrieve` first, "
            "or use --method perturb, which needs only the embed stage"
        )
    return tuple(sorted(deps, key=lambda d: d.name))
