"""The trainers' conditions: each embed row's conditioning feature, joined to its image by key.

- `optimize`: `pseudo_txt` of `optimize/{i:05d}.parquet` (Lafite2's pseudo text feature; `optimize:NAME`
  reads the variant `optimize-NAME/`).
- `retrieve`: h0 = normalize(sum_k softmax_k(nbr_sims / tau_r) * txt_emb[nbr_ids]) from
  `retrieve/{i:05d}.parquet` and every `captions/*.parquet` (loaded once); missing neighbours (id -1,
  NaN similarity, zero feature) are masked out of the softmax. The mix is the pipeline's own
  (`methods.retrieve.mix`), so it equals `pipeline optimize --method retrieve`.
- `perturb`: LAFITE, h = normalize(f + xi * eps * |f| / |eps|) on the image embedding f, with fresh
  noise for every (seed, epoch, sample): `methods.perturb.perturb`, applied by the loader.
- `caption`: the CLIP text feature of the image's own caption (the embed sidecar's `caption`), encoded
  once with the cache's CLIP and kept in `{cache}/_trainers/caption_features-{digest}.npy`, outside the
  pipeline-owned stage directories, so every run on the cache shares it. Images without one are left out.

For optimize and retrieve, a stage shard counts only when its manifest was made from the embed shard's
current sidecar (feature_cache.committed reads the rest of the contract).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError
from feature_cache.committed import PartialCache, read_parquet_committed
from feature_cache.embed_rows import EmbedRows
from feature_cache.features import fixed_rows, padded_lists, usable_rows
from feature_cache.layout import shard_out
from feature_cache.steps import command as stage_command
from manifests import digest_json, list_manifests, write_bytes_atomic
from trainers.data.condition_names import CONDITIONS

if TYPE_CHECKING:
    from feature_cache.clip_record import EmbeddedClip


TRAINERS_DIR = "_trainers"  # the only place in a cache that trainers write (shared derived features)


CAPTION_FEATURES_VERSION = "1"


def parse_condition(condition: str) -> tuple[str, str]:
    """`optimize:NAME` -> ("optimize", "NAME"): the optimize stage's variant NAME; others have none."""
    base, _, variant = condition.partition(":")
    return base, variant


def check_condition(condition: str, flag: str = "--condition") -> None:
    from feature_cache.steps import check_variant

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
    from feature_cache.steps import variant_stage

    base, variant = parse_condition(condition)
    return {"optimize": variant_stage(variant), "retrieve": "retrieve"}.get(base, "embed")


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
        out = shard_out(manifest, ".parquet")
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
    outs = [o for m in manifests.values() if (o := shard_out(m, ".parquet")) is not None]
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
            out[idx[start : start + chunk]] = mix_neighbours(bank.emb[pos_c], sims, valid, tau_r)
    return out, skipped


def mix_neighbours(t_k: np.ndarray, sims: np.ndarray, valid: np.ndarray, tau_r: float) -> np.ndarray:
    """h0 of each row from its neighbours' caption features t_k [c, K, D], similarities [c, K] and
    validity [c, K], by the pipeline's own mix (`methods.run`: softmax(sims / tau_r) over
    the valid neighbours, normalised); float32 [c, D], NaN rows without a usable neighbour."""
    import torch

    from methods.retrieve import initial_logits, mix

    mask = torch.from_numpy(valid)
    feats = torch.from_numpy(np.where(valid[..., None], t_k, 0).astype(np.float32))  # [c, K, D]
    scores = torch.from_numpy(np.where(valid, sims, 0).astype(np.float32))  # [c, K]
    h0 = mix(initial_logits(scores, mask, tau_r), mask, feats).numpy()
    ok = valid.any(axis=1) & (np.linalg.norm(np.nan_to_num(h0), axis=1) > 0.5)  # a zero mix stays zero
    h0[~ok] = np.nan
    return h0


def caption_features_path(rows: EmbedRows) -> Path:
    return rows.cache / TRAINERS_DIR / f"caption_features-{rows.digest()[:16]}.npy"


def caption_features(rows: EmbedRows, batch_size: int = 256, device: str = "auto") -> np.ndarray:
    """float16 [N, D]: each embed row's own caption encoded by the cache's CLIP; NaN rows without one.

    Computed once per (embed outputs, CLIP) and shared through `{cache}/_trainers/` (atomic write, so
    concurrent runs at worst both compute it; sealed with its digest, checked at every read). A read-only
    cache keeps the result in memory only.
    """
    import io

    from trainers.data.store_files import sealed, unsealed

    path = caption_features_path(rows)
    n, dim = len(rows), rows.clip.dim
    if path.is_file():
        try:
            cached = np.load(io.BytesIO(unsealed(path.read_bytes())), allow_pickle=False)
            if cached.shape != (n, dim):
                raise ValueError(f"shape {cached.shape}, not {(n, dim)}")
            return cached
        except (OSError, ValueError) as e:  # derived, so trainers remake it rather than fail
            warnings.warn(f"{path}: cannot be read ({e}); recomputing it", stacklevel=2)
    todo = [i for i, c in enumerate(rows.captions) if isinstance(c, str) and c.strip()]
    out = np.full((n, dim), np.nan, dtype=np.float16)
    if todo:
        bundle = load_cache_clip(rows.clip, device)
        from core.clip import encode_texts

        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            emb = encode_texts(bundle, [rows.captions[i].strip() for i in part])
            out[part] = emb.cpu().numpy().astype(np.float16)
    buffer = io.BytesIO()
    np.save(buffer, out, allow_pickle=False)
    try:
        write_bytes_atomic(path, sealed(buffer.getvalue()))
    except OSError as e:
        warnings.warn(f"cannot cache caption features in {path.parent} ({e}); kept in memory", stacklevel=2)
    return out


def load_cache_clip(clip: EmbeddedClip, device: str = "auto"):
    """The cache's CLIP (a `core.clip.ClipBundle`), checked to be the one that made the cache."""
    from core.clip import cached_clip

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


def perturb(f: np.ndarray, noise: np.ndarray, xi: float) -> np.ndarray:
    """LAFITE's perturbation of float32 rows [B, D] with their noise [B, D]: the pipeline's one
    implementation (`methods.perturb.perturb`), on numpy arrays."""
    import torch

    from methods.perturb import perturb as perturb_rows

    return perturb_rows(torch.from_numpy(f), torch.from_numpy(noise), xi).numpy()
