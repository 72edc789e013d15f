"""`trainers compare --features-only`: the conditioning sources compared as features, with no training.

For each method's conditioning feature h (what `trainers.data.loader` feeds a generator: `perturb`,
`retrieve`, `optimize`, `caption`), over the cache's images f (the image embeddings):

- `cos_image`: mean cos(f_i, h_i).
- `top1`: in-batch top-1, the share of rows whose h_i is closer to its own f_i than to every other image
  of its batch; batches of at most `TOP1_BATCH` = 256 images, near-equal splits of one seeded shuffle of
  the evaluated images (the same batches for every method that has a feature for the same rows), chance
  `top1_chance` = batches / rows.
- `attribute_precision`: of the exact nearest caption of the cache's corpus (`captions/`) to h_i, by
  `world.attribute_precision` (the definition the retrieve and optimize stats report too).
- `text_text`: Lafite2 Figure 1's other panel: mean cos(h_i, t_i) with the real caption feature t_i of
  the same image, against cos(h_i, t_j) for a random other image j.
- `cone`: where h sits between the two modality cones: the mean of <h_i, g> along the unit gap direction
  g = (mean f - mean t) / |mean f - mean t| (the images sit at `modality_gap.image_along_gap`, their
  captions at `modality_gap.caption_along_gap`), and mean cos(h_i, mean f) and cos(h_i, mean t).

`modality_gap` (the cache's CLIP, on these images): the gap vector's length |mean f - mean t|, cos(image,
own caption), and text-text cos of two real captions of the same image (where the images have several,
as the partial world's do: the second is encoded here) against captions of random images.

`perturb` is one seeded draw of LAFITE's noise at the loader's default xi; `retrieve` is the loader's h0
at its default tau_r; `caption` is the images' own captions encoded by the cache's CLIP (shared with the
trainers in `{cache}/_trainers/`). A method whose stage the cache lacks is skipped with the reason.

Writes `OUT/features.json` (what `feature_report` returns), `OUT/features.md` (one row per method, plus
chance) and `OUT/similarity_histograms.png` (the Lafite2 Figure 1 histograms).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import ConfigError
from manifests import write_bytes_atomic, write_json_atomic
from trainers.compare.arms import parse_arm
from trainers.compare.feature_plots import histogram_counts, markdown, plot, rounded
from trainers.data.condition_names import CONDITIONS

METHODS = CONDITIONS  # each condition's features, in report order
TOP1_BATCH = 256  # images per in-batch top-1 batch (near-equal splits of one seeded shuffle)
# numpy stream ids under the seed
SUBSET_STREAM, BATCH_STREAM, NOISE_STREAM, RANDOM_PAIR_STREAM = 0, 1, 2, 3

if TYPE_CHECKING:
    from trainers.compare.config import CompareConfig


def feature_report(
    cache: Path,
    out: Path,
    methods: Sequence[str] = METHODS,
    device: str = "auto",
    seed: int = 0,
    max_images: int | None = None,
) -> dict:
    """Compare the conditioning features of `methods` on the cache's images (module docstring); writes
    OUT/features.json, OUT/features.md, OUT/similarity_histograms.png and returns the json's dict.

    `max_images`: evaluate a seeded random subset of at most that many images (None: all of them).
    """
    import torch

    from feature_cache.embed_rows import read_embed
    from feature_cache.features import usable_rows
    from trainers.runtime.runs import select_device
    from world.attribute_precision import CHANCE, DEFINITION, target_object

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"--conditions: choose from {', '.join(METHODS)} (got {', '.join(methods) or 'none'})"
        )
    if max_images is not None and max_images < 2:
        raise ConfigError("--max-images must be at least 2 (in-batch top-1 needs negatives)")
    t0 = time.perf_counter()
    cache, out = Path(cache), Path(out)
    dev = select_device(device)
    rows = read_embed(cache)
    try:
        candidates = np.flatnonzero(usable_rows(rows.img_emb))  # embed rows evaluated
        if max_images is not None and len(candidates) > max_images:
            rng = np.random.default_rng([seed, SUBSET_STREAM])
            candidates = np.sort(rng.choice(candidates, max_images, replace=False))
        f = _unit(rows.img_emb[candidates].astype(np.float32))  # [n, D]
        truths = [target_object(rows.labels[i]) for i in candidates.tolist()]
        batch_order = np.random.default_rng([seed, BATCH_STREAM]).permutation(len(candidates))

        captions, caption_note = _caption_features(rows, str(dev))
        t = None if captions is None else captions[candidates].astype(np.float32)  # [n, D], NaN rows
        bank, bank_note = _corpus_bank(cache, rows.clip.dim)

        gap, cones = _modality_gap(rows, candidates, f, t, str(dev), seed)
        results: dict[str, dict[str, Any]] = {}
        scored: dict[str, dict[str, np.ndarray]] = {}  # per method: the similarity samples for the plots
        for method in methods:
            h, skipped_shards, reason = _features(method, rows, candidates, captions, caption_note, seed)
            if h is None:
                results[method] = {"status": "skipped", "reason": reason}
                continue
            ok = usable_rows(h)
            if not ok.any():
                results[method] = {
                    "status": "skipped",
                    "reason": "no usable feature among the evaluated images",
                }
                continue
            h = _unit(np.where(ok[:, None], h, 0.0))
            cos = np.sum(f * h, axis=1)[ok]
            top1, batches = _in_batch_top1(h, f, ok, batch_order, dev)
            row: dict[str, Any] = {
                "status": "ok",
                "n": int(ok.sum()),
                "cos_image": rounded(cos.mean()),
                "top1": rounded(top1),
                "top1_chance": rounded(batches / ok.sum()),
                "attribute_precision": None,
                "text_text": None,
            }
            if skipped_shards:
                row["shards_not_usable"] = {str(s): why for s, why in sorted(skipped_shards.items())}
            if bank is not None:
                from methods.common import nearest_caption_precision

                labelled = [truth if good else None for truth, good in zip(truths, ok.tolist(), strict=True)]
                h_t = torch.from_numpy(np.ascontiguousarray(h)).to(dev)
                row["attribute_precision"] = nearest_caption_precision(bank, h_t, labelled, dev)
            samples = {"image": cos}
            if cones is not None:
                row["cone"], samples["along_gap"] = _cone(h[ok], cones)
            if t is not None and method != "caption":
                same, rand = _text_text(h, t, ok, seed)
                if len(same):
                    row["text_text"] = {
                        "same": rounded(same.mean()),
                        "random": rounded(rand.mean()),
                        "n": len(same),
                    }
                    samples.update(same=same, random=rand)
            results[method] = row
            scored[method] = samples

        if "caption" not in scored and t is not None and usable_rows(t).any():
            # Lafite2 Fig. 1 always sets the features against cos(image, own real caption), compared or not
            have = usable_rows(t)
            scored["caption"] = {"image": np.sum(f[have] * _unit(t[have]), axis=1)}
            if cones is not None:
                scored["caption"]["along_gap"] = _unit(t[have]) @ cones["direction"]
        reference = _caption_reference(t, seed)
        histograms = histogram_counts(scored, reference)
        report: dict[str, Any] = {
            "cache": str(cache),
            "methods": results,
            "n_images": len(rows),
            "n_evaluated": len(candidates),
            "max_images": max_images,
            "seed": seed,
            "top1_batch_size": TOP1_BATCH,
            "dim": rows.clip.dim,
            "clip": {"clip_model": rows.clip.clip_model, "clip_pretrained": rows.clip.clip_pretrained},
            "device": str(dev),
            "attribute_precision_definition": DEFINITION,
            "attribute_precision_note": bank_note
            or (None if any(truths) else "no image carries attribute labels (synthetic world only)"),
            "caption_note": caption_note,
            "chance": {
                **{a: rounded(p) for a, p in CHANCE.items()},
                "object": rounded(math.prod(CHANCE.values())),
                "mean": rounded(sum(CHANCE.values()) / len(CHANCE)),
            },
            "real_caption_random_pair_cos": None if reference is None else rounded(reference.mean()),
            "modality_gap": gap,
            "histograms": histograms,
        }
        out.mkdir(parents=True, exist_ok=True)
        along_images = None if cones is None else f @ cones["direction"]
        figure = plot(scored, reference, along_images, out / "similarity_histograms.png")
        report["files"] = {
            "json": str(out / "features.json"),
            "markdown": str(out / "features.md"),
            "histograms": str(figure),
        }
        report["seconds"] = round(time.perf_counter() - t0, 3)
        write_bytes_atomic(out / "features.md", markdown(report).encode())
        write_json_atomic(out / "features.json", report)
        return report
    finally:
        rows.images.close()


# ---------------------------------------------------------------------------------------------------------
# The features, per method
# ---------------------------------------------------------------------------------------------------------


def _features(
    method: str,
    rows,
    candidates: np.ndarray,
    captions: np.ndarray | None,
    caption_note: str | None,
    seed: int,
) -> tuple[np.ndarray | None, dict[int, str], str | None]:
    """(float32 [n, D] feature of each evaluated image, NaN rows where none; shards not usable; None) or
    (None, {}, why the method is skipped)."""
    from trainers.data.conditions import optimize_features, perturb, retrieve_features
    from trainers.data.loader import LoaderConfig

    defaults = LoaderConfig(cache=rows.cache)
    if method == "perturb":
        # One seeded draw of the loader's noise distribution (it draws afresh every epoch).
        f = rows.img_emb[candidates].astype(np.float32)  # [n, D]
        noise = np.random.default_rng([seed, NOISE_STREAM]).standard_normal(f.shape, np.float32)
        return perturb(f, noise, defaults.xi), {}, None
    if method == "caption":
        if captions is None:
            return None, {}, caption_note
        h = captions[candidates].astype(np.float32)
        if not np.isfinite(h).all(axis=1).any():
            return None, {}, "no evaluated image has a caption (--condition caption needs them)"
        return h, {}, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # partly made stages are reported in the row instead
            if method == "optimize":
                h, skipped = optimize_features(rows)
            else:
                h, skipped = retrieve_features(rows, defaults.tau_r)
    except ConfigError as e:
        return None, {}, str(e)
    return h[candidates], skipped, None


def _caption_features(rows, device: str) -> tuple[np.ndarray | None, str | None]:
    """The images' own caption features (float16 [N, D], NaN rows without one), or None and why."""
    from trainers.data.conditions import caption_features

    if not any(isinstance(c, str) and c.strip() for c in rows.captions):
        return None, "no image in the cache has a caption"
    try:
        return caption_features(rows, device=device), None
    except ConfigError as e:
        return None, f"the images' captions cannot be encoded: {e}"


def _corpus_bank(cache: Path, dim: int):
    """The corpus caption bank the optimize stage scores against, or (None, why)."""
    from feature_cache.caption_bank import cached_caption_bank
    from feature_cache.committed import caption_deps

    try:
        return cached_caption_bank(cache, caption_deps(cache), dim), None
    except ConfigError as e:
        return None, f"no nearest-caption attribute precision: {e}"


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def _modality_gap(rows, candidates: np.ndarray, f: np.ndarray, t: np.ndarray | None, device: str, seed: int):
    """(the `modality_gap` figures, the cone references) of the cache's CLIP on these images, or (None,
    None) without captions. The references: the unit gap direction g and the unit mean image and mean
    caption features, which `_cone` places each method's features against."""
    from feature_cache.features import usable_rows

    if t is None or not usable_rows(t).any():
        return None, None
    have = usable_rows(t)
    tu = _unit(t[have])
    mean_f, mean_t = f.mean(axis=0), tu.mean(axis=0)
    vector = mean_f - mean_t
    direction = vector / max(float(np.linalg.norm(vector)), 1e-12)
    gap = {
        "length": rounded(np.linalg.norm(vector)),
        "image_along_gap": rounded((f @ direction).mean()),
        "caption_along_gap": rounded((tu @ direction).mean()),
        "cos_image_own_caption": rounded(np.sum(f[have] * tu, axis=1).mean()),
        "text_text_same_image": None,
        "text_text_random_image": None,
    }
    second = _second_captions(rows, candidates, device)
    if second is not None:
        both = have & usable_rows(second)
        if both.sum() >= 2:
            first, other = _unit(t[both]), _unit(second[both])
            gap["text_text_same_image"] = rounded(np.sum(first * other, axis=1).mean())
            partner = _random_partner(len(first), seed)
            gap["text_text_random_image"] = rounded(np.sum(first * other[partner], axis=1).mean())
            gap["text_text_n"] = int(both.sum())
    cones = {
        "direction": direction,
        "image_mean": _unit(mean_f[None])[0],
        "caption_mean": _unit(mean_t[None])[0],
    }
    return gap, cones


def _cone(h: np.ndarray, cones: dict[str, np.ndarray]) -> tuple[dict[str, float], np.ndarray]:
    """Where unit features h sit between the cones: (mean <h, g>, mean cos to the image and caption
    means), and the <h_i, g> samples for the figure."""
    along = h @ cones["direction"]
    return {
        "along_gap": rounded(along.mean()),
        "cos_image_mean": rounded((h @ cones["image_mean"]).mean()),
        "cos_caption_mean": rounded((h @ cones["caption_mean"]).mean()),
    }, along


def _second_captions(rows, candidates: np.ndarray, device: str) -> np.ndarray | None:
    """float32 [n, D]: each evaluated image's second real caption (the world's `{key}.json` lists them in
    the partial world) encoded by the cache's CLIP, NaN rows without one; None when no image has two."""
    from core.clip import encode_texts
    from feature_cache.embed_rows import labels_of
    from trainers.data.conditions import load_cache_clip

    texts = {}
    for k, row in enumerate(candidates.tolist()):
        captions = (labels_of(rows, row) or {}).get("captions")
        if isinstance(captions, list) and len(captions) > 1 and isinstance(captions[1], str) and captions[1]:
            texts[k] = captions[1]
    if not texts:
        return None
    bundle = load_cache_clip(rows.clip, device)
    out = np.full((len(candidates), rows.clip.dim), np.nan, dtype=np.float32)
    keys = list(texts)
    for start in range(0, len(keys), 256):
        part = keys[start : start + 256]
        out[part] = encode_texts(bundle, [texts[k] for k in part]).cpu().numpy().astype(np.float32)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _in_batch_top1(
    h: np.ndarray, f: np.ndarray, ok: np.ndarray, order: np.ndarray, device
) -> tuple[float, int]:
    """(top-1 share, batches) over near-equal splits of `order` restricted to the rows with a feature."""
    import torch

    from methods.common import in_batch_top1

    rows = order[ok[order]]
    batches = np.array_split(rows, math.ceil(len(rows) / TOP1_BATCH))
    hits = 0
    for batch in batches:
        hb = torch.from_numpy(h[batch]).to(device)  # [B, D]
        fb = torch.from_numpy(f[batch]).to(device)  # [B, D]
        hits += in_batch_top1(hb, fb)
    return hits / len(rows), len(batches)


def _random_partner(n: int, seed: int) -> np.ndarray:
    """A seeded derangement of range(n) (n >= 2): i's partner is never i."""
    perm = np.random.default_rng([seed, RANDOM_PAIR_STREAM]).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[perm] = np.roll(perm, -1)
    return partner


def _text_text(h: np.ndarray, t: np.ndarray, ok: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """cos(h_i, t_i) and cos(h_i, t_j) for a random other image j, over rows having both."""
    from feature_cache.features import usable_rows

    both = np.flatnonzero(ok & usable_rows(t))
    if len(both) < 2:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    tb = _unit(t[both])
    hb = h[both]
    partner = _random_partner(len(both), seed)
    return np.sum(hb * tb, axis=1), np.sum(hb * tb[partner], axis=1)


def _caption_reference(t: np.ndarray | None, seed: int) -> np.ndarray | None:
    """cos(t_i, t_j) of real captions of random image pairs: what 'unrelated text' looks like."""
    if t is None:
        return None
    from feature_cache.features import usable_rows

    have = np.flatnonzero(usable_rows(t))
    if len(have) < 2:
        return None
    tb = _unit(t[have])
    return np.sum(tb * tb[_random_partner(len(have), seed)], axis=1)


def features_only(config: CompareConfig) -> dict[str, Any]:
    """The feature-level report alone (no training): OUT/features.json, features.md and the histograms."""
    from trainers.compare.features import feature_report

    Path(config.out).mkdir(parents=True, exist_ok=True)
    methods = [c for c in config.conditions if parse_arm(c) is None]
    if config.arms:  # the arms' features: the language-free condition's and the captions'
        methods += [c for c in (config.language_free, "caption") if c not in methods]
    return feature_report(
        Path(config.cache),
        Path(config.out),
        methods=tuple(methods),
        device=config.device,
        seed=config.eval_seed,
    )
