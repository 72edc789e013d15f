"""`trainers compare --features-only`: the conditioning sources compared as features, with no training.

For each method's conditioning feature h (what `trainers.data` feeds a generator: `perturb`, `retrieve`,
`optimize`, `caption`), over the cache's images f (the image embeddings):

- `cos_image`: mean cos(f_i, h_i).
- `top1`: in-batch top-1, the share of rows whose h_i is closer to its own f_i than to every other image
  of its batch; batches of at most `TOP1_BATCH` = 256 images, near-equal splits of one seeded shuffle of
  the evaluated images (the same batches for every method that has a feature for the same rows), chance
  `top1_chance` = batches / rows.
- `attribute_precision`: of the exact nearest caption of the cache's corpus (`captions/`) to h_i, by
  `pipeline.attribute_precision` (the definition the retrieve and optimize stats report too).
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

import io
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from manifests import write_bytes_atomic, write_json_atomic
from pipeline.errors import ConfigError

METHODS = ("perturb", "retrieve", "optimize", "caption")
TOP1_BATCH = 256  # images per in-batch top-1 batch (near-equal splits of one seeded shuffle)
HIST_BINS = 60
# numpy stream ids under the seed
SUBSET_STREAM, BATCH_STREAM, NOISE_STREAM, RANDOM_PAIR_STREAM = 0, 1, 2, 3


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

    from pipeline.attribute_precision import CHANCE, DEFINITION, target_object
    from pipeline.features import usable_rows
    from trainers.embed_rows import read_embed
    from trainers.runs import select_device

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
                "cos_image": _round(cos.mean()),
                "top1": _round(top1),
                "top1_chance": _round(batches / ok.sum()),
                "attribute_precision": None,
                "text_text": None,
            }
            if skipped_shards:
                row["shards_not_usable"] = {str(s): why for s, why in sorted(skipped_shards.items())}
            if bank is not None:
                from pipeline.optimize import nearest_caption_precision

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
                        "same": _round(same.mean()),
                        "random": _round(rand.mean()),
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
        histograms = _histograms(scored, reference)
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
                **{a: _round(p) for a, p in CHANCE.items()},
                "object": _round(math.prod(CHANCE.values())),
                "mean": _round(sum(CHANCE.values()) / len(CHANCE)),
            },
            "real_caption_random_pair_cos": None if reference is None else _round(reference.mean()),
            "modality_gap": gap,
            "histograms": histograms,
        }
        out.mkdir(parents=True, exist_ok=True)
        along_images = None if cones is None else f @ cones["direction"]
        figure = _plot(scored, reference, along_images, out / "similarity_histograms.png")
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
    from trainers.conditions import optimize_features, perturb, retrieve_features
    from trainers.data import LoaderConfig

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
    from trainers.conditions import caption_features

    if not any(isinstance(c, str) and c.strip() for c in rows.captions):
        return None, "no image in the cache has a caption"
    try:
        return caption_features(rows, device=device), None
    except ConfigError as e:
        return None, f"the images' captions cannot be encoded: {e}"


def _corpus_bank(cache: Path, dim: int):
    """The corpus caption bank the optimize stage scores against, or (None, why)."""
    from pipeline.optimize import caption_deps
    from pipeline.optimize_inputs import cached_caption_bank

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
    from pipeline.features import usable_rows

    if t is None or not usable_rows(t).any():
        return None, None
    have = usable_rows(t)
    tu = _unit(t[have])
    mean_f, mean_t = f.mean(axis=0), tu.mean(axis=0)
    vector = mean_f - mean_t
    direction = vector / max(float(np.linalg.norm(vector)), 1e-12)
    gap = {
        "length": _round(np.linalg.norm(vector)),
        "image_along_gap": _round((f @ direction).mean()),
        "caption_along_gap": _round((tu @ direction).mean()),
        "cos_image_own_caption": _round(np.sum(f[have] * tu, axis=1).mean()),
        "text_text_same_image": None,
        "text_text_random_image": None,
    }
    second = _second_captions(rows, candidates, device)
    if second is not None:
        both = have & usable_rows(second)
        if both.sum() >= 2:
            first, other = _unit(t[both]), _unit(second[both])
            gap["text_text_same_image"] = _round(np.sum(first * other, axis=1).mean())
            partner = _random_partner(len(first), seed)
            gap["text_text_random_image"] = _round(np.sum(first * other[partner], axis=1).mean())
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
        "along_gap": _round(along.mean()),
        "cos_image_mean": _round((h @ cones["image_mean"]).mean()),
        "cos_caption_mean": _round((h @ cones["caption_mean"]).mean()),
    }, along


def _second_captions(rows, candidates: np.ndarray, device: str) -> np.ndarray | None:
    """float32 [n, D]: each evaluated image's second real caption (the world's `{key}.json` lists them in
    the partial world) encoded by the cache's CLIP, NaN rows without one; None when no image has two."""
    from pipeline.clip import encode_texts
    from trainers.conditions import load_cache_clip
    from trainers.embed_rows import labels_of

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


def _round(value: float) -> float:
    return round(float(value), 6)


def _in_batch_top1(
    h: np.ndarray, f: np.ndarray, ok: np.ndarray, order: np.ndarray, device
) -> tuple[float, int]:
    """(top-1 share, batches) over near-equal splits of `order` restricted to the rows with a feature."""
    import torch

    from pipeline.optimize_methods import in_batch_top1

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
    from pipeline.features import usable_rows

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
    from pipeline.features import usable_rows

    have = np.flatnonzero(usable_rows(t))
    if len(have) < 2:
        return None
    tb = _unit(t[have])
    return np.sum(tb * tb[_random_partner(len(have), seed)], axis=1)


def _histograms(scored: dict[str, dict[str, np.ndarray]], reference: np.ndarray | None) -> dict[str, Any]:
    """Counts on shared bin edges (to re-plot), with mean and std, of every plotted distribution."""
    series = {f"{m}/{kind}": v for m, samples in scored.items() for kind, v in samples.items()}
    if reference is not None:
        series["caption/random_real_pair"] = reference
    values = [v for v in series.values() if len(v)]
    if not values:
        return {"edges": [], "series": {}}
    edges = _edges(values)
    return {
        "edges": [_round(e) for e in edges],
        "series": {
            name: {
                "counts": np.histogram(v, edges)[0].tolist(),
                "mean": _round(v.mean()),
                "std": _round(v.std()),
                "n": len(v),
            }
            for name, v in series.items()
            if len(v)
        },
    }


def _edges(values: list[np.ndarray]) -> np.ndarray:
    """HIST_BINS equal bins spanning every series of one panel (so their shapes compare)."""
    values = [v for v in values if len(v)]
    if not values:
        return np.linspace(-1.0, 1.0, HIST_BINS + 1)
    lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    return np.linspace(lo, hi if hi > lo else lo + 1e-3, HIST_BINS + 1)


def _plot(
    scored: dict[str, dict[str, np.ndarray]],
    reference: np.ndarray | None,
    along_images: np.ndarray | None,
    path: Path,
) -> Path:
    """The two Lafite2 Figure 1 panels: cos(image, feature) per method against the real caption's, and
    text-text cosine of each pseudo feature with the same image's real caption vs a random image's; with
    captions, a third: each feature's position along the modality gap direction, between the image cone
    (`along_images`) and the caption cone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"perturb": "tab:red", "retrieve": "tab:orange", "optimize": "tab:blue", "caption": "black"}
    panels = 2 if along_images is None else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    left, right = axes[0], axes[1]
    text_series = [v for samples in scored.values() for k, v in samples.items() if k in ("same", "random")]
    left_edges = _edges([samples["image"] for samples in scored.values()])
    right_edges = _edges(text_series + ([reference] if reference is not None else []))
    for method, samples in scored.items():
        label = "caption (real)" if method == "caption" else method
        width = 2 if method == "caption" else 1.2
        style = dict(histtype="step", density=True, color=colours[method])
        left.hist(samples["image"], bins=left_edges, linewidth=width, label=label, **style)
        if "same" in samples:
            right.hist(samples["same"], bins=right_edges, label=f"{method}: same image", **style)
            right.hist(
                samples["random"], bins=right_edges, linestyle="--", label=f"{method}: random image", **style
            )
    if reference is not None:
        right.hist(
            reference,
            bins=right_edges,
            histtype="stepfilled",
            density=True,
            color="grey",
            alpha=0.3,
            label="real captions: random pair",
        )
    left.set(title="cos(image, conditioning feature)", xlabel="cosine", ylabel="density")
    right.set(title="cos(feature, real caption feature)", xlabel="cosine", ylabel="density")
    if along_images is not None:
        cones = axes[2]
        along = {m: samples["along_gap"] for m, samples in scored.items() if "along_gap" in samples}
        edges = _edges([along_images, *along.values()])
        cones.hist(along_images, bins=edges, histtype="stepfilled", density=True, color="grey", alpha=0.3,
                   label="images")  # fmt: skip
        for method, values in along.items():
            label = "caption (real)" if method == "caption" else method
            cones.hist(values, bins=edges, histtype="step", density=True, color=colours[method], label=label)
        cones.set(title="position along the modality gap (image mean - text mean)", xlabel="<x, g>")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data (needs captions)", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def gap_lines(gap: dict[str, Any] | None) -> list[str]:
    """The modality gap paragraph of features.md (none without captions)."""
    if not gap:
        return []
    same, other = gap.get("text_text_same_image"), gap.get("text_text_random_image")
    texts = (
        f"; two real captions of the same image {same:.3f}, of random images {other:.3f}"
        if same is not None
        else ""
    )
    return [
        "",
        "Modality gap of the cache's CLIP on these images: |mean image - mean caption| = "
        f"{gap['length']:.3f}; cos(image, own caption) {gap['cos_image_own_caption']:.3f}{texts}. Along the "
        f"gap direction g the images sit at {gap['image_along_gap']:.3f} and their captions at "
        f"{gap['caption_along_gap']:.3f}: the `along gap` column places each feature between the two cones.",
    ]


def markdown(report: dict[str, Any]) -> str:
    """features.md: one row per method, a chance row, and the skipped methods with their reasons."""
    from pipeline.attribute_precision import ATTRIBUTES

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.3f}"

    header = (
        "| method | n | cos(image, h) | top-1 (B<=256) | "
        + " | ".join(ATTRIBUTES)
        + " | object | mean | cos(h, own caption) | cos(h, random caption) | along gap |"
    )
    lines = [
        "# Conditioning features compared",
        "",
        f"Cache `{report['cache']}`: {report['n_evaluated']:,} of {report['n_images']:,} images, seed "
        f"{report['seed']}. In-batch top-1: batches of at most {report['top1_batch_size']} images, "
        "near-equal splits of one seeded shuffle. Attributes: precision of the nearest real caption of the "
        f"corpus ({report['attribute_precision_definition']}).",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    skipped = []
    for method, row in report["methods"].items():
        if row["status"] != "ok":
            skipped.append(f"- `{method}` skipped: {row['reason']}")
            continue
        precision = row["attribute_precision"] or {}
        text = row["text_text"] or {}
        cells = [
            method,
            f"{row['n']:,}",
            cell(row["cos_image"]),
            cell(row["top1"]),
            *(cell(precision.get(a)) for a in (*ATTRIBUTES, "object", "mean")),
            cell(text.get("same")),
            cell(text.get("random")),
            cell((row.get("cone") or {}).get("along_gap")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    chance = report["chance"]
    top1_chance = min(
        (r["top1_chance"] for r in report["methods"].values() if r["status"] == "ok"), default=None
    )
    lines.append(
        "| chance | | | "
        + cell(top1_chance)
        + " | "
        + " | ".join(cell(chance[a]) for a in (*ATTRIBUTES, "object", "mean"))
        + " | | "
        + cell(report["real_caption_random_pair_cos"])
        + " | |"
    )
    notes = [n for n in (report["attribute_precision_note"], report["caption_note"]) if n]
    lines += ["", *skipped, *(f"- {n}" for n in notes)]
    lines += [*gap_lines(report.get("modality_gap"))]
    lines += [
        "",
        "The chance row's cos(h, random caption) cell is cos(real caption, real caption of a random image).",
        "",
        "![similarity histograms](similarity_histograms.png)",
        "",
    ]
    return "\n".join(lines)
