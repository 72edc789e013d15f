"""What `trainers compare --features-only` writes besides features.json (trainers/compare/features.py): the
histograms' counts, the Lafite2 Figure 1 figure (similarity_histograms.png) and features.md."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from manifests import write_bytes_atomic

pass

HIST_BINS = 60


def histogram_counts(
    scored: dict[str, dict[str, np.ndarray]], reference: np.ndarray | None
) -> dict[str, Any]:
    """Counts on shared bin edges (to re-plot), with mean and std, of every plotted distribution."""
    series = {f"{m}/{kind}": v for m, samples in scored.items() for kind, v in samples.items()}
    if reference is not None:
        series["caption/random_real_pair"] = reference
    values = [v for v in series.values() if len(v)]
    if not values:
        return {"edges": [], "series": {}}
    edges = _edges(values)
    return {
        "edges": [rounded(e) for e in edges],
        "series": {
            name: {
                "counts": np.histogram(v, edges)[0].tolist(),
                "mean": rounded(v.mean()),
                "std": rounded(v.std()),
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


def plot(
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
    from world.attribute_precision import ATTRIBUTES

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


def rounded(value: float) -> float:
    return round(float(value), 6)
