"""The trainers' one loader: images from the embed tars joined by key with a conditioning feature.

    loader = make_loader(LoaderConfig(cache=Path("cache"), condition="optimize", batch_size=64))
    batch = next(loader)  # image [B,3,H,W] in [-1,1], cond [B,D] unit-norm, key list[str], paired bool [B]

Conditions (each row's feature, joined to its image by key):

- `optimize`: `pseudo_txt` of `optimize/{i:05d}.parquet` (Lafite2's pseudo text feature).
- `retrieve`: h0 = normalize(sum_k softmax_k(nbr_sims / tau_r) * txt_emb[nbr_ids]) from
  `retrieve/{i:05d}.parquet` and every `captions/*.parquet` (loaded once); missing neighbours (id -1,
  NaN similarity, zero feature) are masked out of the softmax.
- `perturb`: LAFITE, h = normalize(f + xi * eps * |f| / |eps|) on the image embedding f, with fresh
  noise for every (seed, epoch, sample).
- `caption`: the CLIP text feature of the image's own caption (the embed sidecar's `caption`), encoded
  once with the cache's CLIP and kept in `{cache}/_trainers/caption_features-{digest}.npy`, outside the
  pipeline-owned stage directories, so every run on the cache shares it. Images without one are left out.

`paired_fraction` / `paired_limit` mix real-caption features into the other conditions (see
`LoaderConfig`); the batch's `paired` flags say which rows got one.

Only committed shards are read: a stage output counts when its manifest exists, its file size matches the
manifest's `outs` (a shard being rewritten does not), and, for optimize/retrieve, the manifest was made
from the embed shard's current sidecar. Each file is opened once, checked with `fstat` and then read
through that descriptor, so a later rewrite of the path (the pipeline commits with `os.replace`) cannot
change what this run reads. Nothing in the pipeline-owned directories is ever written.

A cache the condition can only partly use (a shard being rewritten, stale, or not made yet by its stage)
is waited for, re-reading the manifests for up to `PARTIAL_WAIT_S`, then refused with a `PartialCache`
naming the shards; `allow_partial` trains on the rest instead, and `LoaderInfo.record()` says exactly
which rows (the run's config.json and every eval.json of it keep that record). A committed file that does
not decode, or whose Parquet bytes differ from the manifest's digest (bit rot), is an `Unreadable` naming
the file and `pipeline run --verify`; a damaged derived file in `_trainers/` is recomputed with a warning.

Order: the sample stream is the concatenation of epoch permutations, epoch e from (seed, e); batch s is
stream positions [s*B, (s+1)*B). So `make_loader(cfg, start_step=s)` resumes by arithmetic, without
decoding anything it skips, and every random draw depends only on (seed, epoch, sample), never on the
worker count.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from manifests import digest_bytes, digest_json, list_manifests, write_bytes_atomic
from manifests.errors import CacheFault, damaged
from manifests.faults import stall_point
from pipeline.errors import ConfigError
from pipeline.features import fixed_rows, padded_lists, usable_rows

if TYPE_CHECKING:
    import torch

    from pipeline.embed import EmbeddedClip

CONDITIONS = ("optimize", "retrieve", "perturb", "caption")
TRAINERS_DIR = "_trainers"  # the only place in a cache that trainers write (shared derived features)
CAPTION_FEATURES_VERSION = "1"
IMAGE_EXTS = ("jpg", "png", "webp")
# numpy stream ids under the seed: every random draw is a pure function of (seed, stream, ...)
SHUFFLE_STREAM, NOISE_STREAM, PAIRED_STREAM, POOL_STREAM = 0, 1, 2, 3
# How long a loader waits for shards being rewritten (or not made yet) to be committed before refusing a
# partial cache: a stage commits a shard's manifest right after replacing its files.
PARTIAL_WAIT_S = 30.0
PARTIAL_POLL_S = 1.0  # between re-reads of the manifests while waiting
STAGE_COMMANDS = {
    "embed": "pipeline embed INPUT... --cache {cache}",
    "retrieve": "pipeline retrieve --captions CORPUS --cache {cache}",
    "optimize": "pipeline optimize --cache {cache}",
}


def stage_command(stage: str, cache: Path) -> str:
    """The command that makes `stage` (an optimize variant's included) in `cache`."""
    if stage.startswith("optimize-"):
        return f"pipeline optimize --variant {stage.removeprefix('optimize-')} --cache {cache}"
    return STAGE_COMMANDS[stage].format(cache=cache)


def parse_condition(condition: str) -> tuple[str, str]:
    """`optimize:NAME` -> ("optimize", "NAME"): the optimize stage's variant NAME; others have none."""
    base, _, variant = condition.partition(":")
    return base, variant


def check_condition(condition: str, flag: str = "--condition") -> None:
    from pipeline.optimize import check_variant

    base, variant = parse_condition(condition)
    if base not in CONDITIONS or (":" in condition and base != "optimize"):
        raise ConfigError(
            f"{flag} {condition}: choose one of {', '.join(CONDITIONS)}, or optimize:VARIANT (a variant "
            "made by `pipeline optimize --variant VARIANT`)"
        )
    check_variant(variant)


def stage_condition(stage: str) -> str:
    """The condition that reads `stage`'s features, for the stages that have one (`condition_stage`'s
    inverse): optimize-NAME -> optimize:NAME, retrieve -> retrieve."""
    return stage.replace("-", ":", 1) if stage.startswith("optimize-") else stage


def condition_stage(condition: str) -> str:
    """The stage whose shards a condition reads its features from (embed for perturb and caption)."""
    from pipeline.optimize import variant_stage

    base, variant = parse_condition(condition)
    return {"optimize": variant_stage(variant), "retrieve": "retrieve"}.get(base, "embed")


@dataclass(frozen=True)
class LoaderConfig:
    cache: Path
    condition: str = "optimize"  # optimize[:VARIANT] | retrieve | perturb | caption
    batch_size: int = 64
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    paired_fraction: float = 0.0  # fraction of samples whose condition is the real-caption feature instead
    paired_limit: int | None = (
        None  # use real captions for at most N images (few-shot); the rest per `condition`
    )
    xi: float = 3.0  # LAFITE perturbation strength for condition="perturb"
    tau_r: float = 0.05  # softmax temperature for condition="retrieve"
    allow_partial: bool = False  # train on the usable shards when some are being rewritten, stale or unmade
    partial_wait_s: float | None = None  # seconds to wait for them to be committed; None: PARTIAL_WAIT_S

    def validate(self) -> None:
        check_condition(self.condition)
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.workers < 0:
            raise ConfigError("--workers must be 0 (load in the main process) or more")
        if self.seed < 0:
            raise ConfigError("--seed must be 0 or more")
        if not 0.0 <= self.paired_fraction <= 1.0:
            raise ConfigError("--paired-fraction must be between 0 and 1")
        if self.paired_limit is not None and self.paired_limit < 0:
            raise ConfigError("--paired-limit must be 0 or more")
        if self.condition == "caption" and self.paired_fraction > 0:
            raise ConfigError(
                "--paired-fraction mixes real captions into another condition; with --condition caption "
                "every sample is paired already (use --paired-limit N to train on N pairs only)"
            )
        if not np.isfinite(self.xi) or self.xi < 0:
            raise ConfigError("--xi must be a finite number >= 0")
        if not np.isfinite(self.tau_r) or self.tau_r <= 0:
            raise ConfigError("--tau-r must be a positive number")
        if self.partial_wait_s is not None and not self.partial_wait_s >= 0:
            raise ConfigError("partial_wait_s must be 0 or more seconds")

    @property
    def needs_captions(self) -> bool:
        return self.condition == "caption" or self.paired_fraction > 0 or bool(self.paired_limit)

    @property
    def paired_probability(self) -> float:
        """Chance that a pool image's sample uses its caption: `paired_limit` alone means always."""
        if self.paired_limit and self.paired_fraction == 0.0:
            return 1.0
        return self.paired_fraction


def cache_clip(cache: Path) -> EmbeddedClip:
    """Which CLIP made the cache (model/weights args, identity, dim); ConfigError without embed."""
    from pipeline.embed import embedded_clip

    cache = Path(cache)
    if not cache.is_dir():
        raise ConfigError(
            f"--cache {cache}: no such directory; make one with `pipeline embed INPUT... --cache`"
        )
    return embedded_clip(cache)


def feature_dim(cache: Path) -> int:
    return int(cache_clip(cache).dim)


def missing_stage_error(cache: Path, condition: str) -> ConfigError:
    """The one-line error for a condition whose stage has nothing committed, naming the command to run."""
    stage = condition_stage(condition)
    run = f"run `{stage_command(stage, cache)}`" + {
        "optimize": " (after `pipeline retrieve`)",
        "caption": " on images that have captions",
    }.get(parse_condition(condition)[0], "")
    alternative = ", or train with --condition perturb (needs only embed)" if stage != "embed" else ""
    return ConfigError(
        f"--cache {cache}: --condition {condition} needs the {stage} stage, which has no committed "
        f"shards; {run}{alternative}"
    )


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
        super().__init__(
            f"--cache {cache}: part of the cache is not usable{after}: {describe_skipped(skipped)}. Wait for "
            f"the running stage to commit them or rerun it ({runs}){partial}"
        )


# ---------------------------------------------------------------------------------------------------------
# Committed files, opened once
# ---------------------------------------------------------------------------------------------------------


def _out(manifest: dict[str, Any], suffix: str) -> dict[str, Any] | None:
    return next((o for o in manifest.get("outs", []) if o["path"].endswith(suffix)), None)


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


def _raise_fd_limit(needed: int) -> None:
    """One fd per embed tar is held for the run; lift the soft limit towards the hard one if needed."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention (as the embed writer uses it): key up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def index_tar(fd: int) -> dict[str, tuple[int, int, str]]:
    """key -> (data offset, size, ext) of each image member of an embed tar, read from the headers only.

    The embed writer makes plain USTAR tars, parsed here with one 512-byte `pread` per member: 0.24 s for
    a 10,000-image shard where `tarfile` took 1.0 s. Anything else (pax or GNU long names) goes to tarfile.
    """
    members: dict[str, tuple[int, int, str]] = {}
    offset, end = 0, os.fstat(fd).st_size
    while offset + 512 <= end:
        header = os.pread(fd, 512, offset)
        if header[:1] == b"\0":  # end-of-archive blocks
            return members
        typeflag = header[156:157]
        if header[257:262] != b"ustar" or typeflag not in (b"0", b"\0", b"5"):
            return _index_tar_slow(fd)
        try:
            size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        except ValueError:
            return _index_tar_slow(fd)
        name = header[:100].split(b"\0")[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0")[0].decode("utf-8", "surrogateescape")
        if prefix:
            name = f"{prefix}/{name}"
        if typeflag != b"5":
            key, ext = _split_member(name)
            if ext in IMAGE_EXTS:
                members[key] = (offset + 512, size, ext)
        offset += 512 + -(-size // 512) * 512
    return members


def _index_tar_slow(fd: int) -> dict[str, tuple[int, int, str]]:
    members: dict[str, tuple[int, int, str]] = {}
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    key, ext = _split_member(info.name)
                    if ext in IMAGE_EXTS:
                        members[key] = (info.offset_data, info.size, ext)
    return members


class TarImages:
    """Random access to the images of the embed tars: one fd per shard, `os.pread` at indexed offsets.

    `pread` does not move a shared file offset, so the fds can be inherited by forked DataLoader workers;
    a spawned worker reopens the paths (and re-checks their sizes) instead.
    """

    def __init__(
        self, cache: Path, tar_outs: dict[int, dict[str, Any]], fds: dict[int, int], image_size: int
    ):
        self.cache = Path(cache)
        self.tar_outs = tar_outs
        self.image_size = image_size  # stored side; 0: the first image decides
        self._fds = fds

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = open_committed(self.cache, self.tar_outs[shard])
            if fd is None:
                raise RuntimeError(
                    f"{self.tar_outs[shard]['path']} changed while training (its size no longer matches its "
                    "manifest); the cache must stay frozen while trainers read it"
                )
            self._fds[shard] = fd
        return fd

    def read(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise RuntimeError(f"{self.tar_outs[shard]['path']}: short read at {offset}")
        return data

    def decode(self, data: bytes, what: str) -> torch.Tensor:
        """Encoded image -> uint8 [3, S, S] at the cache's stored size."""
        import torch
        from torchvision.io import ImageReadMode, decode_image

        try:
            pixels = decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
        except RuntimeError:
            import io

            from PIL import Image

            try:
                with Image.open(io.BytesIO(data)) as img:
                    array = np.asarray(img.convert("RGB"))
            except Exception as e:  # noqa: BLE001 - any decoder failure is the same problem here
                # embed stored only images it had decoded: this one was damaged since
                raise damaged(what, e, self.cache) from None
            pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)
        if self.image_size == 0:
            self.image_size = int(pixels.shape[-1])
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            pixels = _fit_square(pixels, self.image_size)
        return pixels

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}


def _fit_square(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop to a square and resize (only caches embedded with --image-size 0 need this)."""
    import torch.nn.functional as F

    h, w = pixels.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = pixels[:, top : top + side, left : left + side].float()[None]
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]
    return out.round().clamp(0, 255).to(pixels.dtype)


# ---------------------------------------------------------------------------------------------------------
# The embed stage: every committed row
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EmbedRows:
    """Every committed embed row, concatenated in (shard, row) order, with random access to its image."""

    cache: Path
    clip: EmbeddedClip
    shards: list[int]  # committed, intact shards read
    parquet_outs: dict[int, dict[str, Any]]  # shard -> the sidecar's manifest `out` (path, size, digest)
    keys: list[str]
    shard_of: np.ndarray  # int32 [N]
    img_emb: np.ndarray  # float16 [N, D]
    captions: list[str | None]
    labels: list[str | None]  # JSON strings (the source's json), or None
    offsets: np.ndarray  # int64 [N]: image member data offset in the shard's tar
    sizes: np.ndarray  # int64 [N]
    images: TarImages
    skipped_shards: dict[int, str] = field(default_factory=dict)  # shard -> why it was not read

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def image_size(self) -> int:
        return self.images.image_size

    def image(self, row: int) -> torch.Tensor:
        """uint8 [3, S, S] of row `row`."""
        shard = int(self.shard_of[row])
        data = self.images.read(shard, int(self.offsets[row]), int(self.sizes[row]))
        tar = self.cache / self.images.tar_outs[shard]["path"]
        return self.images.decode(data, f"{tar} (the image of key {self.keys[row]!r})")

    def pixels(self, rows) -> torch.Tensor:
        """uint8 [B, 3, S, S] of several rows."""
        import torch

        return torch.stack([self.image(int(r)) for r in rows])

    def digest(self) -> str:
        """Identity of exactly these rows: the sidecars' output digests and the CLIP identity."""
        return digest_json(
            {
                "embed": [
                    [self.parquet_outs[s]["path"], self.parquet_outs[s]["digest"]] for s in self.shards
                ],
                "clip": self.clip.identity,
            }
        )


def read_embed(cache: Path, warn: bool = True) -> EmbedRows:
    """The committed embed rows of a cache. Shards whose files do not match their manifest are skipped
    (listed in `skipped_shards`, and warned about unless `warn` is False); none readable is a ConfigError
    naming `pipeline embed` (a `PartialCache` when some were skipped). A damaged shard is `Unreadable`."""
    cache = Path(cache)
    clip = cache_clip(cache)
    manifests = list_manifests(cache, "embed")
    _raise_fd_limit(len(manifests) + 256)
    shards, parquet_outs, tar_outs, fds, skipped = [], {}, {}, {}, {}
    keys: list[str] = []
    parts: dict[str, list] = {"shard_of": [], "img_emb": [], "offsets": [], "sizes": []}
    captions: list[str | None] = []
    labels: list[str | None] = []
    stored_sizes = set()
    for shard, manifest in sorted(manifests.items()):
        p_out, t_out = _out(manifest, ".parquet"), _out(manifest, ".tar")
        if p_out is None or t_out is None:
            skipped[shard] = "manifest lists no tar or no sidecar"
            continue
        fd = open_committed(cache, t_out)
        try:
            table = read_parquet_committed(cache, p_out) if fd is not None else None
            shard_keys = table["key"].to_pylist() if table is not None else []
            found = _image_members(cache, t_out, fd, shard_keys) if table is not None else []
        except BaseException:  # a damaged shard: hold no descriptors
            for held in [fd, *fds.values()] if fd is not None else fds.values():
                os.close(held)
            raise
        if fd is None or table is None:
            if fd is not None:
                os.close(fd)
            skipped[shard] = "files missing or being rewritten (size differs from the manifest)"
            continue
        parts["offsets"].append(np.array([m[0] for m in found], dtype=np.int64))
        parts["sizes"].append(np.array([m[1] for m in found], dtype=np.int64))
        parts["shard_of"].append(np.full(len(shard_keys), shard, dtype=np.int32))
        parts["img_emb"].append(fixed_rows(table["img_emb"], clip.dim, np.float16, "nan")[0])
        keys += shard_keys
        captions += (
            table["caption"].to_pylist() if "caption" in table.column_names else [None] * len(shard_keys)
        )
        labels += table["labels"].to_pylist() if "labels" in table.column_names else [None] * len(shard_keys)
        shards.append(shard)
        parquet_outs[shard], tar_outs[shard], fds[shard] = p_out, t_out, fd
        stored_sizes.add(int(manifest.get("params", {}).get("image_size", 0)))
    if not shards:
        if skipped:
            raise PartialCache(cache, {"embed": skipped}, rest=False)
        raise ConfigError(
            f"--cache {cache}: no committed embed shard could be read; run `pipeline embed INPUT... "
            f"--cache {cache}`"
        )
    if skipped and warn:
        warnings.warn(
            f"--cache {cache}: skipped {len(skipped)} embed shard(s): {_describe(skipped)}", stacklevel=2
        )
    if len(set(keys)) != len(keys):
        twice = next(k for k, n in Counter(keys).items() if n > 1)
        raise ConfigError(
            f"--cache {cache}: key {twice!r} appears in two embed shards (inputs whose keys collide, "
            "embedded before embed refused them); rebuild the cache with `pipeline embed INPUT... "
            "--key-prefix input --force` so every key is prefixed with its input folder's name"
        )
    image_size = stored_sizes.pop() if len(stored_sizes) == 1 else 0
    return EmbedRows(
        cache=cache,
        clip=clip,
        shards=shards,
        parquet_outs=parquet_outs,
        keys=keys,
        shard_of=np.concatenate(parts["shard_of"]),
        img_emb=np.concatenate(parts["img_emb"]),
        captions=captions,
        labels=labels,
        offsets=np.concatenate(parts["offsets"]),
        sizes=np.concatenate(parts["sizes"]),
        images=TarImages(cache, tar_outs, fds, image_size),
        skipped_shards=skipped,
    )


def _image_members(
    cache: Path, t_out: dict[str, Any], fd: int, keys: list[str]
) -> list[tuple[int, int, str]]:
    """(offset, size, ext) of each sidecar key's image in the shard's tar. Embed stores one for every row,
    so a tar that does not parse, or a key without its image (a damaged header), is `damaged`."""
    path = Path(cache) / t_out["path"]
    try:
        members = index_tar(fd)
    except (tarfile.TarError, ValueError, OSError) as e:
        raise damaged(path, e, cache) from None
    found = [members.get(k) for k in keys]
    lost = [k for k, m in zip(keys, found, strict=True) if m is None]
    if lost:
        raise damaged(
            path, ValueError(f"{len(lost)} of its {len(keys)} images are missing, e.g. {lost[0]!r}"), cache
        )
    return found


def _describe(skipped: dict[int, str]) -> str:
    by_reason = Counter(skipped.values())
    return "; ".join(
        f"{reason} ({', '.join(str(s) for s, r in sorted(skipped.items()) if r == reason)[:60]})"
        for reason in by_reason
    )


def describe_skipped(skipped: dict[str, dict[int, str]]) -> str:
    """stage -> shard -> reason, as `optimize shards: not made yet (1, 2); ...`."""
    return "; ".join(f"{stage} shards: {_describe(s)}" for stage, s in skipped.items())


def cache_image_size(cache: Path) -> int:
    """The stored image side of a cache (what generators are trained at)."""
    rows = read_embed(cache)
    try:
        if rows.image_size == 0:
            rows.image(0)
        return rows.image_size
    finally:
        rows.images.close()


# ---------------------------------------------------------------------------------------------------------
# Condition sources
# ---------------------------------------------------------------------------------------------------------


def _stage_rows(rows: EmbedRows, stage: str, columns: list[str]) -> tuple[dict[int, Any], dict[int, str]]:
    """The committed tables of `stage` aligned to the embed shards read; shard -> why not, for the rest.
    A stage that never ran is a ConfigError naming it; one with no usable shard now, a `PartialCache`."""
    manifests = list_manifests(rows.cache, stage)
    if not manifests:
        raise missing_stage_error(rows.cache, stage_condition(stage))
    tables, skipped = {}, {}
    for shard in rows.shards:
        manifest = manifests.get(shard)
        if manifest is None:
            skipped[shard] = "not made yet"
            continue
        out = _out(manifest, ".parquet")
        embed_out = rows.parquet_outs[shard]
        dep_digests = {
            d.get("digest") for d in manifest.get("deps", []) if d.get("name") == embed_out["path"]
        }
        if out is None:
            skipped[shard] = "manifest lists no Parquet output"
        elif dep_digests and embed_out["digest"] not in dep_digests:
            skipped[shard] = "made from an older embed shard (stale)"
        else:
            table = read_parquet_committed(rows.cache, out, columns)
            if table is None:
                skipped[shard] = "file missing or being rewritten"
            else:
                tables[shard] = table
    if not tables:
        raise PartialCache(rows.cache, {stage: skipped}, rest=False)
    return tables, skipped


def _row_positions(rows: EmbedRows) -> dict[int, dict[str, int]]:
    positions: dict[int, dict[str, int]] = {}
    for i, (shard, key) in enumerate(zip(rows.shard_of.tolist(), rows.keys, strict=True)):
        positions.setdefault(shard, {})[key] = i
    return positions


def _embed_rows_of(table, where: dict[str, int], stage: str, shard: int) -> np.ndarray:
    """int64 embed-row index of each of a `stage` shard's keys; a key embed does not hold is stale."""
    idx = np.array([where.get(k, -1) for k in table["key"].to_pylist()], dtype=np.int64)
    if idx.size and (idx < 0).any():
        raise ConfigError(
            f"{stage} shard {shard} holds keys that embed shard {shard} does not; rerun `pipeline {stage}`"
        )
    return idx


def optimize_features(rows: EmbedRows, stage: str = "optimize") -> tuple[np.ndarray, dict[int, str]]:
    """float32 [N, D] pseudo_txt per embed row (NaN rows where the optimize stage, or its variant
    `stage`, has none), and the shards not usable with why."""
    tables, skipped = _stage_rows(rows, stage, ["key", "pseudo_txt"])
    out = np.full((len(rows), rows.clip.dim), np.nan, dtype=np.float32)
    positions = _row_positions(rows)
    for shard, table in tables.items():
        idx = _embed_rows_of(table, positions[shard], stage, shard)
        out[idx] = fixed_rows(table["pseudo_txt"], rows.clip.dim, np.float32, "nan")[0]
    return out, skipped


@dataclass
class CaptionBank:
    """Every committed caption feature: `emb[row]` is caption `ids[row]` (ids sorted)."""

    ids: np.ndarray  # int64 [M]
    emb: np.ndarray  # float16 [M, D]
    usable: np.ndarray  # bool [M]: finite, non-zero
    key: str


_CAPTION_BANKS: dict[str, CaptionBank] = {}


def caption_bank(cache: Path, dim: int) -> CaptionBank:
    """The caption features of `captions/*.parquet`, loaded once per process (keyed by their digests)."""
    manifests = list_manifests(cache, "captions")
    outs = [o for m in manifests.values() if (o := _out(m, ".parquet")) is not None]
    key = digest_json(sorted([o["path"], o["digest"]] for o in outs))
    if key in _CAPTION_BANKS:
        return _CAPTION_BANKS[key]
    ids, embs = [], []
    for out in sorted(outs, key=lambda o: o["path"]):
        table = read_parquet_committed(cache, out, ["caption_id", "txt_emb"])
        if table is None:
            raise ConfigError(
                f"--cache {cache}: {out['path']} is missing or being rewritten; wait for `pipeline retrieve` "
                "to finish or rerun it"
            )
        ids.append(table["caption_id"].to_numpy(zero_copy_only=False).astype(np.int64))
        embs.append(fixed_rows(table["txt_emb"], dim, np.float16, "nan")[0])
    if not ids:
        raise ConfigError(
            f"--cache {cache}: no caption features (captions/*.parquet) for the retrieve neighbours; run "
            f"`pipeline retrieve --captions CORPUS --cache {cache}`"
        )
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")
    emb = np.concatenate(embs)[order]
    bank = CaptionBank(all_ids[order], emb, usable_rows(emb), key)
    _CAPTION_BANKS.clear()
    _CAPTION_BANKS[key] = bank
    return bank


def retrieve_features(rows: EmbedRows, tau_r: float, chunk: int = 8192) -> tuple[np.ndarray, dict[int, str]]:
    """float32 [N, D] h0 per embed row (see the module docstring; NaN rows without a usable neighbour),
    and the shards not usable with why."""

    tables, skipped = _stage_rows(rows, "retrieve", ["key", "nbr_ids", "nbr_sims"])
    bank = caption_bank(rows.cache, rows.clip.dim)
    out = np.full((len(rows), rows.clip.dim), np.nan, dtype=np.float32)
    positions = _row_positions(rows)
    for shard, table in tables.items():
        idx = _embed_rows_of(table, positions[shard], "retrieve", shard)
        nbr_ids = padded_lists(table["nbr_ids"], -1, np.int64)
        nbr_sims = padded_lists(table["nbr_sims"], np.nan, np.float32)
        for start in range(0, len(idx), chunk):
            ids = nbr_ids[start : start + chunk]  # [c, K]
            sims = nbr_sims[start : start + chunk]  # [c, K]
            pos = np.searchsorted(bank.ids, ids)
            pos_c = np.minimum(pos, len(bank.ids) - 1)
            known = bank.ids[pos_c] == ids
            unknown = ~known & (ids != -1)
            if unknown.any():
                raise ConfigError(
                    f"retrieve shard {shard}: {int(unknown.sum())} nbr_ids (e.g. {int(ids[unknown][0])}) "
                    "are not in captions/; the retrieve stage is out of date: rerun `pipeline retrieve`"
                )
            valid = known & bank.usable[pos_c] & np.isfinite(sims)  # [c, K]
            logits = np.where(valid, np.nan_to_num(sims) / tau_r, -np.inf)
            top = logits.max(axis=1, keepdims=True)
            weights = np.where(valid, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)  # [c, K]
            t_k = bank.emb[pos_c].astype(np.float32)  # [c, K, D]
            h0 = np.einsum("ck,ckd->cd", weights, t_k)  # softmax normalisation cancels in the normalize
            norms = np.linalg.norm(h0, axis=1, keepdims=True)
            ok = valid.any(axis=1) & (norms[:, 0] > 1e-6)
            h0 = np.where(ok[:, None], h0 / np.maximum(norms, 1e-12), np.nan)
            out[idx[start : start + chunk]] = h0
    return out, skipped


def caption_features_path(rows: EmbedRows) -> Path:
    return rows.cache / TRAINERS_DIR / f"caption_features-{rows.digest()[:16]}.npy"


def caption_features(rows: EmbedRows, batch_size: int = 256, device: str = "auto") -> np.ndarray:
    """float16 [N, D]: each embed row's own caption encoded by the cache's CLIP; NaN rows without one.

    Computed once per (embed outputs, CLIP) and shared through `{cache}/_trainers/` (atomic write, so
    concurrent runs at worst both compute it). A read-only cache keeps the result in memory only.
    """
    path = caption_features_path(rows)
    n, dim = len(rows), rows.clip.dim
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape != (n, dim):
                raise ValueError(f"shape {cached.shape}, not {(n, dim)}")
            return cached
        except (OSError, ValueError) as e:  # derived, so trainers remake it rather than fail
            warnings.warn(f"{path}: cannot be read ({e}); recomputing it", stacklevel=2)
    todo = [i for i, c in enumerate(rows.captions) if isinstance(c, str) and c.strip()]
    out = np.full((n, dim), np.nan, dtype=np.float16)
    if todo:
        bundle = load_cache_clip(rows.clip, device)
        from pipeline.clip import encode_texts

        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            emb = encode_texts(bundle, [rows.captions[i].strip() for i in part])
            out[part] = emb.cpu().numpy().astype(np.float16)
    import io

    buffer = io.BytesIO()
    np.save(buffer, out, allow_pickle=False)
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as e:
        warnings.warn(f"cannot cache caption features in {path.parent} ({e}); kept in memory", stacklevel=2)
    return out


def load_cache_clip(clip: EmbeddedClip, device: str = "auto"):
    """The cache's CLIP (a `pipeline.clip.ClipBundle`), checked to be the one that made the cache."""
    from pipeline.clip import cached_clip

    try:
        bundle = cached_clip(clip.clip_model, clip.clip_pretrained or None, device)
    except ConfigError as e:
        raise ConfigError(
            f"the cache's CLIP (--clip-model {clip.clip_model} --clip-pretrained "
            f"{clip.clip_pretrained!r}, as given to `pipeline embed`) cannot be loaded: {e}"
        ) from None
    if bundle.identity != clip.identity:
        raise ConfigError(
            f"the CLIP files given to `pipeline embed` ({clip.clip_model}, {clip.clip_pretrained!r}) changed "
            "since the cache was made; restore them or rerun `pipeline embed`"
        )
    return bundle


# ---------------------------------------------------------------------------------------------------------
# The dataset and the loader
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LoaderInfo:
    """What the loader found: for logs and the run's config.json."""

    condition: str
    n_images: int  # images in the sample set
    image_size: int
    dim: int
    excluded: dict[str, int]  # embed rows left out, by reason
    paired_pool: int  # images that may be given their real caption's feature
    paired_probability: float  # chance a pool image's sample is paired, per epoch
    skipped_shards: dict[str, dict[int, str]]  # stage -> shard -> reason
    caption_features: str | None  # the shared caption-feature file, when captions were needed
    clip: dict[str, Any]  # clip_model, clip_pretrained, identity
    shards: dict[str, list[int]] = field(default_factory=dict)  # stage -> shards read
    keys_digest: str = ""  # digest_json of the sample set's keys, in sample order
    provenance: dict[str, Any] = field(default_factory=dict)  # where the condition came from (`provenance`)
    pair_keys: list[str] | None = None  # with paired_limit: the keys of the images given their caption

    def record(self) -> dict[str, Any]:
        """Exactly which rows a run trains on (plain JSON types): kept in its config.json and checkpoints,
        and copied into every eval.json of it, so a run on a partial cache (--allow-partial) says so."""
        return {
            "condition": self.condition,
            "n_images": self.n_images,
            "partial": bool(self.skipped_shards),
            "shards": {stage: list(shards) for stage, shards in self.shards.items()},
            "skipped_shards": {
                stage: {str(shard): why for shard, why in s.items()}
                for stage, s in self.skipped_shards.items()
            },
            "excluded": dict(self.excluded),
            "keys_digest": self.keys_digest,
            "pairs": self.paired_pool,
            "pairs_digest": digest_json(self.pair_keys) if self.pair_keys is not None else None,
            "provenance": self.provenance,
        }


class CacheDataset:
    """Map-style dataset indexed by a *list of stream positions*: returns one whole batch dict.

    Sample `j` of the set is embed row `rows_idx[j]`; stream position t is sample perm_e[t % N] of epoch
    e = t // N. Picklable (for spawned workers); arrays are shared copy-on-write with forked ones.
    """

    def __init__(
        self,
        rows: EmbedRows,
        rows_idx: np.ndarray,
        cond: np.ndarray,
        *,
        seed: int,
        perturb_xi: float | None,
        paired_feat: np.ndarray | None,
        paired_pool: np.ndarray,
        paired_probability: float,
    ):
        self.rows = rows
        self.rows_idx = rows_idx  # int64 [N]: embed row of each sample
        self.cond = cond  # float16 [N, D]: the condition (the image embedding itself for perturb)
        self.seed = seed
        self.perturb_xi = perturb_xi
        self.paired_feat = paired_feat  # float16 [N, D] real-caption features (NaN rows outside the pool)
        self.paired_pool = paired_pool  # bool [N]
        self.paired_probability = paired_probability
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.rows_idx)

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(permutation [N], paired draws bool [N] by sample, or None) of epoch e, cached for two epochs."""
        if e not in self._epochs:
            n = len(self.rows_idx)
            perm = np.random.default_rng([self.seed, SHUFFLE_STREAM, e]).permutation(n)
            paired = None
            if self.paired_pool.any():
                if self.paired_probability >= 1.0:
                    paired = self.paired_pool
                else:
                    draws = np.random.default_rng([self.seed, PAIRED_STREAM, e]).random(n)
                    paired = self.paired_pool & (draws < self.paired_probability)
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (perm, paired)
        return self._epochs[e]

    def samples(self, positions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream positions -> (sample index [B], epoch [B], paired [B])."""
        n = len(self.rows_idx)
        samples = np.empty(len(positions), dtype=np.int64)
        epochs = np.empty(len(positions), dtype=np.int64)
        paired = np.zeros(len(positions), dtype=bool)
        for b, t in enumerate(positions):
            e, j = divmod(int(t), n)
            perm, drawn = self.epoch(e)
            samples[b], epochs[b] = perm[j], e
            paired[b] = bool(drawn[perm[j]]) if drawn is not None else False
        return samples, epochs, paired

    def __getitem__(self, positions: list[int]) -> dict[str, Any]:
        import torch

        stall_point("trainers:load")
        samples, epochs, paired = self.samples(positions)
        cond = self.cond[samples].astype(np.float32)  # [B, D]
        if self.perturb_xi is not None:
            noise = np.stack(
                [
                    np.random.default_rng([self.seed, NOISE_STREAM, int(e), int(j)]).standard_normal(
                        cond.shape[1]
                    )
                    for e, j in zip(epochs, samples, strict=True)
                ]
            ).astype(np.float32)  # [B, D]
            cond = perturb(cond, noise, self.perturb_xi)
        if paired.any() and self.paired_feat is not None:
            cond[paired] = self.paired_feat[samples[paired]].astype(np.float32)
        cond /= np.maximum(np.linalg.norm(cond, axis=1, keepdims=True), 1e-12)
        rows = self.rows_idx[samples]
        pixels = self.rows.pixels(rows)  # uint8 [B, 3, S, S]
        return {
            "image": pixels.float().div_(127.5).sub_(1.0),  # [B, 3, S, S] in [-1, 1]
            "cond": torch.from_numpy(cond),  # [B, D]
            "key": [self.rows.keys[r] for r in rows.tolist()],
            "paired": torch.from_numpy(paired),  # [B]
        }


def perturb(f: np.ndarray, noise: np.ndarray, xi: float) -> np.ndarray:
    """LAFITE: normalize(f + xi * eps * |f| / |eps|), rows of float32 [B, D]."""
    f_norm = np.linalg.norm(f, axis=1, keepdims=True)
    eps_norm = np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    h = f + xi * noise * f_norm / eps_norm
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)


class BatchPositions:
    """Infinite sampler of stream positions: step s -> [s*B, (s+1)*B)."""

    def __init__(self, batch_size: int, start_step: int):
        self.batch_size, self.start_step = batch_size, start_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield list(range(step * self.batch_size, (step + 1) * self.batch_size))
            step += 1


def _identity(batch):
    return batch


class CacheLoader:
    """The iterator `make_loader` returns: batches forever; `info` says what was loaded."""

    def __init__(
        self, dataset: CacheDataset, info: LoaderInfo, batch_size: int, start_step: int, workers: int
    ):
        import torch

        from pipeline.processes import limit_threads, loader_worker_init

        self.dataset, self.info = dataset, info
        self.step = start_step
        limit_threads(workers)  # training here shares the cores with the loader workers
        self._loader = torch.utils.data.DataLoader(
            dataset,
            sampler=BatchPositions(batch_size, start_step),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=4 if workers else None,
            pin_memory=torch.cuda.is_available(),  # batches go to the GPU next
            worker_init_fn=loader_worker_init() if workers else None,
        )
        self._iter = iter(self._loader)

    def __iter__(self) -> CacheLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            batch = next(self._iter)
        except CacheFault as e:
            lines = str(e).strip().splitlines()
            if len(lines) > 1:  # re-raised from a worker with its traceback: keep the one-line message
                raise type(e)(lines[-1].partition(": ")[2]) from None
            raise
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes and close the tar descriptors (optional: process exit does both)."""
        self._iter = None
        self.dataset.rows.images.close()


def _read_sources(config: LoaderConfig) -> tuple[EmbedRows, np.ndarray | None, dict[str, dict[int, str]]]:
    """(embed rows, the optimize/retrieve features or None, stage -> shard -> why not usable), read once."""
    rows = read_embed(config.cache, warn=False)
    skipped = {"embed": rows.skipped_shards} if rows.skipped_shards else {}
    stage = condition_stage(config.condition)
    try:
        if stage.startswith("optimize"):
            cond, stage_skipped = optimize_features(rows, stage)
        elif stage == "retrieve":
            cond, stage_skipped = retrieve_features(rows, config.tau_r)
        else:
            return rows, None, skipped
    except PartialCache as e:
        rows.images.close()
        raise PartialCache(config.cache, {**skipped, **e.skipped}) from None
    except BaseException:
        rows.images.close()
        raise
    if stage_skipped:
        skipped[stage] = stage_skipped
    return rows, cond, skipped


def _read_committed(config: LoaderConfig) -> tuple[EmbedRows, np.ndarray | None, dict[str, dict[int, str]]]:
    """`_read_sources`, once every shard the condition reads is usable: while some are not (being
    rewritten, stale, not made yet), re-read up to `partial_wait_s`, then raise `PartialCache`; with
    `allow_partial`, take the usable ones at once (with a warning)."""
    wait = PARTIAL_WAIT_S if config.partial_wait_s is None else config.partial_wait_s
    start, told = time.monotonic(), False
    while True:
        try:
            found = _read_sources(config)
            skipped = found[2]
        except PartialCache as e:  # nothing usable at all yet
            found, skipped = None, e.skipped
        if found is not None and (not skipped or config.allow_partial):
            if skipped:
                warnings.warn(
                    f"--cache {config.cache}: --allow-partial: leaving out {describe_skipped(skipped)}",
                    stacklevel=3,
                )
            return found
        if found is not None:
            found[0].images.close()
        waited = time.monotonic() - start
        if waited >= wait:
            raise PartialCache(config.cache, skipped, waited, rest=found is not None)
        if not told:  # the wait can take `wait` seconds: say why
            told = True
            warnings.warn(
                f"--cache {config.cache}: waiting up to {wait:g} s for {describe_skipped(skipped)}",
                stacklevel=3,
            )
        time.sleep(min(PARTIAL_POLL_S, wait - waited))


def build_dataset(config: LoaderConfig) -> tuple[CacheDataset, LoaderInfo]:
    """Read the cache and join every image with its condition (see the module docstring)."""
    config.validate()
    cache = Path(config.cache)
    rows, cond, skipped = _read_committed(config)
    excluded: Counter = Counter()
    keep = np.ones(len(rows), dtype=bool)
    stage = condition_stage(config.condition)
    from_stage, stage_skipped = cond is not None, skipped.get(stage, {})
    if from_stage:
        if stage_skipped:
            in_skipped = np.isin(rows.shard_of, list(stage_skipped))
            excluded[f"{stage}_shard_not_usable"] += int(in_skipped.sum())
            keep &= ~in_skipped
        reason = "no_usable_neighbours" if stage == "retrieve" else "no_optimize_row"
    else:
        cond, reason = rows.img_emb, "bad_img_emb"

    caption_feat, caption_path = None, None
    if config.needs_captions:
        caption_feat = caption_features(rows)
        caption_path = str(caption_features_path(rows))
        if config.condition == "caption":
            cond, reason = caption_feat, "no_caption"
    usable = usable_rows(cond)
    excluded[reason] += int((keep & ~usable).sum())
    keep &= usable
    rows_idx = np.flatnonzero(keep)
    if len(rows_idx) == 0:
        if config.condition == "caption":
            raise ConfigError(
                f"--cache {cache}: no image in the cache has a caption, so --condition caption has "
                "nothing to train on; embed images that have captions or pick another --condition"
            )
        raise missing_stage_error(cache, config.condition)

    if config.condition == "caption":
        if config.paired_limit is not None:  # a supervised few-shot baseline: only N pairs
            chosen = _pool_subset(len(rows_idx), config.paired_limit, config.seed)
            excluded["beyond_paired_limit"] += len(rows_idx) - len(chosen)
            rows_idx = rows_idx[chosen]
            if len(rows_idx) == 0:
                raise ConfigError("--paired-limit 0 with --condition caption leaves nothing to train on")
        pool = np.ones(len(rows_idx), dtype=bool)
        paired_feat, probability = None, 1.0  # `cond` is the caption feature already
    elif caption_feat is not None:
        candidates = np.flatnonzero(usable_rows(caption_feat[rows_idx]))
        if len(candidates) == 0:
            raise ConfigError(
                f"--cache {cache}: --paired-fraction/--paired-limit need images with captions, and none "
                f"of the {len(rows_idx)} images has one"
            )
        if config.paired_limit is not None:
            candidates = candidates[_pool_subset(len(candidates), config.paired_limit, config.seed)]
        pool = np.zeros(len(rows_idx), dtype=bool)
        pool[candidates] = True
        paired_feat = np.where(pool[:, None], caption_feat[rows_idx], np.nan).astype(np.float16)
        probability = config.paired_probability if pool.any() else 0.0
    else:
        pool, paired_feat, probability = np.zeros(len(rows_idx), dtype=bool), None, 0.0

    dataset = CacheDataset(
        rows,
        rows_idx,
        cond[rows_idx].astype(np.float16),
        seed=config.seed,
        perturb_xi=config.xi if config.condition == "perturb" else None,
        paired_feat=paired_feat,
        paired_pool=pool,
        paired_probability=probability,
    )
    if rows.image_size == 0:
        rows.image(int(rows_idx[0]))  # the first image decides the size of a --image-size 0 cache
    info = LoaderInfo(
        condition=config.condition,
        n_images=len(rows_idx),
        image_size=rows.image_size,
        dim=rows.clip.dim,
        excluded={k: v for k, v in sorted(excluded.items()) if v},
        paired_pool=int(pool.sum()),
        paired_probability=float(probability),
        skipped_shards=skipped,
        caption_features=caption_path,
        clip={
            "clip_model": rows.clip.clip_model,
            "clip_pretrained": rows.clip.clip_pretrained,
            "identity": rows.clip.identity,
        },
        shards={
            "embed": list(rows.shards),
            **({stage: [s for s in rows.shards if s not in stage_skipped]} if from_stage else {}),
        },
        keys_digest=digest_json([rows.keys[int(r)] for r in rows_idx]),
        provenance=provenance(config, rows, [s for s in rows.shards if s not in stage_skipped]),
        pair_keys=[rows.keys[int(r)] for r in rows_idx[pool]] if config.paired_limit is not None else None,
    )
    return dataset, info


def provenance(config: LoaderConfig, rows: EmbedRows, shards: list[int]) -> dict[str, Any]:
    """Exactly where a run's condition came from: the stage and variant, the method and keyed params its
    shards were made with, and a digest of those shards' manifests (their keys and output digests), so
    two runs agree on it only when they read the same features. Perturb and caption are computed here
    from the embed stage, with the loader's own params."""
    base, variant = parse_condition(config.condition)
    stage = condition_stage(config.condition)
    manifests = list_manifests(rows.cache, stage)
    made = [manifests[s] for s in shards if s in manifests]
    params = [m.get("params", {}) for m in made]
    if base == "perturb":
        method, keyed = "perturb", {"xi": config.xi, "seed": config.seed}
    elif base == "caption":
        method, keyed = "caption", {}
    elif base == "retrieve":
        method, keyed = "retrieve", {"tau_r": config.tau_r, "search": params[0] if params else {}}
    else:
        method, keyed = (params[0].get("method") if params else None), params[0] if params else {}
    return {
        "stage": stage,
        "variant": variant if base == "optimize" else None,
        "method": method,
        "params": keyed,
        "mixed_params": any(p != params[0] for p in params),  # shards made with different params
        "manifests_digest": digest_json(
            [[m["shard"], m.get("key"), [o["digest"] for o in m["outs"]]] for m in made]
        ),
    }


def _pool_subset(n: int, limit: int, seed: int) -> np.ndarray:
    """A fixed, seeded choice of min(limit, n) of n candidates (sorted, so sample order stays shard order)."""
    chosen = np.random.default_rng([seed, POOL_STREAM]).permutation(n)[: min(limit, n)]
    return np.sort(chosen)


def make_loader(config: LoaderConfig, start_step: int = 0) -> CacheLoader:
    """Infinite iterator of batches (see the module docstring); `.info` describes the sample set."""
    if start_step < 0:
        raise ConfigError("start_step must be 0 or more")
    dataset, info = build_dataset(config)
    return CacheLoader(dataset, info, config.batch_size, start_step, config.workers)


def labels_of(rows: EmbedRows, row: int) -> dict[str, Any] | None:
    """The source's json of an embed row (the synthetic world's labels), parsed; None if absent or bad."""
    raw = rows.labels[row]
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
