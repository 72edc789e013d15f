"""Per-shard manifests: the commit point of every stage output, and staleness.

Each shard of each stage has `{cache}/{stage}/_manifests/{shard:05d}.json`. It is written last, after
every output file has been committed, so an output without a matching manifest counts as missing.

    key = hash(stage, stage_version, keyed params, sorted dep digests)

Keyed params are only those that change the output (model, image size, k, ...); unkeyed params (batch
size, workers, device) are recorded but do not stale a shard. Downstream stages use their upstream's
*output* digests as deps, so a rerun that reproduces identical bytes stops the cascade.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manifests.atomic import write_json_atomic
from manifests.digest import digest_file_content, digest_json
from manifests.faults import crash_point

MANIFEST_DIR = "_manifests"
# Per-shard statistics, in an underscore folder that Parquet dataset discovery ignores, so a stage folder
# of Parquet files reads as one table (pyarrow, pandas, HF datasets). Caches made before kept them as
# `{stage}/{i:05d}.stats.json`: still read there, and moved on the shard's next commit.
STATS_DIR = "_stats"
STAT_CACHE_FILE = "_stat_cache.json"  # copied outputs (new mtime) whose bytes were verified: copied_output_ok
# `pipeline run --verify` / `status --verify`: every output check in the plans re-hashes the bytes,
# once per file (several stages check the embed outputs): path -> content digest, or None when off.
_VERIFIED: ContextVar[dict[str, str] | None] = ContextVar("verified_outputs", default=None)


@contextmanager
def verifying_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, `check_outputs` (so every stage's planning) compares content digests too."""
    token = _VERIFIED.set(_VERIFIED.get() if _VERIFIED.get() is not None or not enabled else {})
    try:
        yield
    finally:
        _VERIFIED.reset(token)


@dataclass(frozen=True)
class Dep:
    """One input of a shard: a raw file or an upstream output, by digest."""

    name: str
    digest: str


@dataclass(frozen=True)
class Out:
    """One committed output file, relative to the cache root."""

    path: str
    size: int
    digest: str
    rows: int | None = None
    mtime_ns: int = 0


@dataclass
class ShardSpec:
    """What a shard must be made from; its `key` decides whether an existing output is reusable."""

    stage: str
    shard: int
    stage_version: str
    params: dict[str, Any]
    deps: list[Dep]
    unkeyed: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return fingerprint_key(self.stage, self.stage_version, self.params, [d.digest for d in self.deps])


def fingerprint_key(stage: str, stage_version: str, params: dict[str, Any], dep_digests: list[str]) -> str:
    return digest_json([stage, stage_version, params, sorted(dep_digests)])


def manifest_path(cache: Path, stage: str, shard: int) -> Path:
    return Path(cache) / stage / MANIFEST_DIR / f"{shard:05d}.json"


def stats_path(cache: Path, stage: str, shard: int) -> Path:
    return Path(cache) / stage / STATS_DIR / f"{shard:05d}.json"


def _legacy_stats_path(cache: Path, stage: str, shard: int) -> Path:
    return Path(cache) / stage / f"{shard:05d}.stats.json"


def write_stats(cache: Path, stage: str, shard: int, stats: dict[str, Any]) -> None:
    """Commit a shard's statistics (before its manifest), replacing a copy in the old layout."""
    write_json_atomic(stats_path(cache, stage, shard), stats)
    _legacy_stats_path(cache, stage, shard).unlink(missing_ok=True)


def read_stats(cache: Path, stage: str, shard: int) -> dict[str, Any] | None:
    """A shard's statistics (either layout), or None; damaged bytes are `Unreadable` naming the fix."""
    from manifests.errors import read_json, remake_shard_fix

    for path in (stats_path(cache, stage, shard), _legacy_stats_path(cache, stage, shard)):
        try:
            return read_json(path, remake_shard_fix(cache, stage, shard))
        except FileNotFoundError:
            continue
    return None


def migrate_stats(cache: Path, stage: str) -> int:
    """Move stats left in the old layout into `_stats/` (call while holding the cache lock)."""
    moved = 0
    for old in sorted((Path(cache) / stage).glob("[0-9]*.stats.json")):
        new = stats_path(cache, stage, int(old.name.split(".")[0]))
        new.parent.mkdir(parents=True, exist_ok=True)
        os.replace(old, new)
        moved += 1
    return moved


def remove_stats(cache: Path, stage: str, shard: int) -> None:
    for path in (stats_path(cache, stage, shard), _legacy_stats_path(cache, stage, shard)):
        path.unlink(missing_ok=True)


def environment() -> dict[str, str]:
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname()}
    for mod in ("torch", "open_clip", "faiss", "pyarrow", "numpy"):
        module = sys.modules.get(mod)
        if module is not None:
            env[mod] = str(getattr(module, "__version__", "?"))
    return env


def stat_out(cache: Path, rel: str, size: int, digest: str, rows: int | None = None) -> Out:
    """Record an output just committed; its mtime lets `check_shard` notice later alterations cheaply."""
    return Out(path=rel, size=size, digest=digest, rows=rows, mtime_ns=os.stat(Path(cache) / rel).st_mtime_ns)


def commit_manifest(
    cache: Path, spec: ShardSpec, outs: list[Out], timings: dict[str, float], extra: dict | None = None
) -> dict[str, Any]:
    """Write the manifest (the commit point) and return it as a dict."""
    manifest = {
        "stage": spec.stage,
        "shard": spec.shard,
        "stage_version": spec.stage_version,
        "key": spec.key,
        "params": spec.params,
        "unkeyed": spec.unkeyed,
        "deps": [{"name": d.name, "digest": d.digest} for d in spec.deps],
        "outs": [o.__dict__ for o in outs],
        "env": environment(),
        "timings": timings,
        "created": time.time(),
        **(extra or {}),
    }
    crash_point(f"{spec.stage}:{spec.shard:05d}:before_manifest")
    write_json_atomic(manifest_path(cache, spec.stage, spec.shard), manifest)
    return manifest


def read_manifest(cache: Path, stage: str, shard: int) -> dict[str, Any] | None:
    path = manifest_path(cache, stage, shard)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn manifest cannot exist (atomic writes), but a hand-edited one can: redo the shard


def absent_reason(cache: Path, stage: str, shard: int) -> str:
    """Why a shard without a readable manifest must be made: new, or its manifest is missing or damaged."""
    if manifest_path(cache, stage, shard).exists():
        return "manifest unreadable (damaged): shard will be remade"
    if any((Path(cache) / stage).glob(f"{shard:05d}.*")):
        return "manifest missing (outputs exist without it): shard will be remade"
    return "new shard"


def list_manifests(cache: Path, stage: str) -> dict[int, dict[str, Any]]:
    """All readable manifests of a stage, by shard."""
    out: dict[int, dict[str, Any]] = {}
    directory = Path(cache) / stage / MANIFEST_DIR
    if directory.is_dir():
        for p in sorted(directory.glob("[0-9]*.json")):
            manifest = read_manifest(cache, stage, int(p.stem))
            if manifest is not None:
                out[int(p.stem)] = manifest
    return out


def check_shard(cache: Path, spec: ShardSpec, *, verify: bool = False) -> str | None:
    """None when the committed shard matches `spec`, else a short reason it must be (re)made.

    Reads only the manifest and file stats; `verify=True` also re-hashes the outputs.
    """
    manifest = read_manifest(cache, spec.stage, spec.shard)
    if manifest is None:
        return absent_reason(cache, spec.stage, spec.shard)
    if manifest.get("key") == spec.key:
        return check_outputs(cache, manifest, verify=verify)
    if manifest.get("stage_version") != spec.stage_version:
        return f"stage code version {manifest.get('stage_version')} -> {spec.stage_version}"
    old_params = manifest.get("params", {})
    changed = sorted(k for k in set(old_params) | set(spec.params) if old_params.get(k) != spec.params.get(k))
    if changed:
        return "params changed: " + ", ".join(changed)
    return "inputs changed"


def check_outputs(cache: Path, manifest: dict[str, Any], *, verify: bool = False) -> str | None:
    """None when every output matches the manifest's size and mtime (and digest, when verifying).

    An output whose size matches but whose mtime does not (a copy: `cp -r`, rsync without -t, tar, a
    restore) is checked by content once, and its new stat remembered (`copied_output_ok`).
    """
    verified = _VERIFIED.get()
    for out in manifest.get("outs", []):
        path = Path(cache) / out["path"]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"output missing: {out['path']}"
        if st.st_size != out["size"]:
            return f"output altered: {out['path']}"
        if out.get("mtime_ns") and st.st_mtime_ns != out["mtime_ns"]:
            if not copied_output_ok(path, st, out["digest"], verified, rehash=verify):
                return f"output altered: {out['path']}"
        elif (verify or verified is not None) and _content_digest(path, st, verified) != out["digest"]:
            return f"output damaged (content digest differs): {out['path']}"
    return None


def copied_output_ok(
    path: Path, st: os.stat_result, digest: str, memo: dict[str, str] | None = None, *, rehash: bool = False
) -> bool:
    """Whether an output with a new mtime still holds its committed bytes: one content hash, then its
    (size, mtime, digest) is remembered in the folder's `_stat_cache.json` so later checks are stat-only.
    When verifying (`rehash`, or inside `verifying_outputs`), a remembered entry is not trusted: bit rot
    keeps size and mtime.

    Safe without the lock: an entry only vouches for exactly that size and mtime, which a rewrite changes.
    """
    entries = _stat_cache(path.parent)
    stat = [st.st_size, st.st_mtime_ns, digest]
    if entries.get(path.name) == stat and not rehash and memo is None:
        return True
    if _content_digest(path, st, memo) != digest:
        return False
    entries[path.name] = stat
    _STAT_CACHE_DIRTY.add(path.parent)
    return True


# folder -> {file name: [size, mtime_ns, digest]}, loaded once per process and written back at exit
_STAT_CACHES: dict[Path, dict[str, list]] = {}
_STAT_CACHE_DIRTY: set[Path] = set()


def _stat_cache(folder: Path) -> dict[str, list]:
    if folder not in _STAT_CACHES:
        try:
            loaded = json.loads((folder / STAT_CACHE_FILE).read_text())
        except (OSError, ValueError):
            loaded = {}
        _STAT_CACHES[folder] = loaded if isinstance(loaded, dict) else {}
    return _STAT_CACHES[folder]


@atexit.register
def flush_stat_caches() -> None:
    """Write the entries this process added (merged with the file's own: another process may have
    added some). No fsync, no lock: losing an entry costs one more hash, nothing else; a cache on a
    read-only mount is still judged right, just hashed again next time."""
    for folder in sorted(_STAT_CACHE_DIRTY):
        path = folder / STAT_CACHE_FILE
        try:
            on_disk = json.loads(path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        merged = {**(on_disk if isinstance(on_disk, dict) else {}), **_STAT_CACHES[folder]}
        tmp = folder / f".{STAT_CACHE_FILE}.tmp-{os.getpid()}"
        try:
            tmp.write_text(json.dumps(merged, separators=(",", ":")))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
    _STAT_CACHE_DIRTY.clear()


def _content_digest(path: Path, st: os.stat_result, memo: dict[str, str] | None) -> str:
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"  # a file remade meanwhile is hashed again
    if memo is None:
        return digest_file_content(path)
    if key not in memo:
        memo[key] = digest_file_content(path)
    return memo[key]
