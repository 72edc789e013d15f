"""The few-shot section of `trainers compare`'s report: Lafite2 Figure 4 from the arms' runs.

For every P given, `fewshot:P` (language-free pre-training, then fine-tuning on P pairs) against
`scratch:P` (supervised from scratch on the same pairs), and `semi:P` when given: mean attribute
accuracy and FID against the number of pairs, with the language-free-only run (`--language-free`) and
the fully supervised one (`caption`) as horizontal references when they are among the conditions.
Made from the summary rows alone (trainers.compare.report), so it costs nothing to rewrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainers.compare.arms import ARMS, parse_arm

if TYPE_CHECKING:
    from trainers.compare.config import CompareConfig, CompareResult

FIGURE = "fewshot.png"
PANELS = (("acc_mean", "mean attribute accuracy (higher is better)"), ("fid", "FID (lower is better)"))


def arm_points(result: CompareResult) -> dict[str, list[tuple[int, str]]]:
    """arm kind -> [(pairs, condition)] sorted by pairs, for the arms in the comparison."""
    points: dict[str, list[tuple[int, str]]] = {}
    for row in result.rows:
        arm = parse_arm(row["condition"])
        if arm is not None and (row["pairs"], row["condition"]) not in points.get(arm.kind, []):
            points.setdefault(arm.kind, []).append((int(row["pairs"]), row["condition"]))
    return {kind: sorted(points[kind]) for kind in ARMS if kind in points}


def references(config: CompareConfig, result: CompareResult) -> dict[str, str]:
    """label -> condition of the horizontal reference lines present in the comparison."""
    found = {}
    for label, condition in (("language-free only", config.language_free), ("fully supervised", "caption")):
        if condition in result.summary:
            found[label] = condition
    return found


MIN_GAP = 0.01  # below this (or the references' spread over seeds) there is no gap to close


def gap_closed(config: CompareConfig, result: CompareResult, condition: str) -> float | None:
    """How much of the language-free -> supervised gap in mean accuracy the condition closes (1: all of
    it). None without both references, or when supervised is not above language-free by more than
    MIN_GAP and the references' std over seeds: a share of a gap within noise means nothing."""
    refs = references(config, result)
    if len(refs) < 2:
        return None
    low = result.summary[refs["language-free only"]]["acc_mean"]
    high = result.summary[refs["fully supervised"]]["acc_mean"]
    value = result.summary[condition]["acc_mean"]["mean"]
    if None in (low["mean"], high["mean"], value):
        return None
    noise = max(MIN_GAP, low["std"] or 0.0, high["std"] or 0.0)
    if high["mean"] - low["mean"] <= noise:
        return None
    return round((value - low["mean"]) / (high["mean"] - low["mean"]), 3)


def _seed_wins(result: CompareResult, better: str, worse: str) -> str:
    """'2/2': seeds on which `better`'s mean accuracy is above `worse`'s."""
    by_seed = {(r["condition"], r["seed"]): r["acc_mean"] for r in result.rows}
    seeds = sorted({s for c, s in by_seed if c == better} & {s for c, s in by_seed if c == worse})
    wins = sum(
        by_seed[(better, s)] is not None
        and by_seed[(worse, s)] is not None
        and by_seed[(better, s)] > by_seed[(worse, s)]
        for s in seeds
    )
    return f"{wins}/{len(seeds)}"


def fewshot_lines(config: CompareConfig, result: CompareResult) -> list[str]:
    """The report's few-shot section (empty without arms)."""
    from trainers.compare.arms import split_budget
    from trainers.compare.tables import cell, markdown_table

    points = arm_points(result)
    if not points:
        return []
    pre, fine = split_budget(config.steps, config.finetune_share)
    lines = [
        "## Few-shot and semi-supervised arms (Lafite2 Figure 4)",
        "",
        f"Every arm has the same budget, {config.steps:,} steps. `fewshot:P`: {pre:,} steps on "
        f"`{config.language_free}` (one pre-training per seed, shared by every P), then {fine:,} on P real "
        "pairs; `scratch:P`: all on the same P pairs (the pairs are drawn from the run's seed; each run's "
        f"pairs.txt lists them); `semi:P`: `{config.language_free}` with P images given their real "
        "captions throughout. Gap closed: (arm - language-free) / (supervised - language-free) in mean "
        f"accuracy, shown only when supervised is above language-free by more than {MIN_GAP} and the "
        "references' std over seeds. Mean ± std over seeds.",
        "",
    ]
    rows = []
    for condition in [c for kind in points.values() for _, c in kind] + list(
        references(config, result).values()
    ):
        summary = result.summary[condition]
        pairs = next((r["pairs"] for r in result.rows if r["condition"] == condition), None)
        gap = gap_closed(config, result, condition)
        rows.append(
            [
                condition,
                f"{pairs:,}" if pairs is not None else ("all" if condition == "caption" else "0"),
                str(summary["acc_mean"]["n"]),
                cell(summary["acc_mean"], False),
                cell(summary["fid"], False),
                "-" if gap is None else f"{gap:.2f}",
            ]
        )
    lines += markdown_table(["condition", "pairs", "runs", "mean accuracy", "FID", "gap closed"], rows)
    scratch = dict((p, c) for p, c in points.get("scratch", []))
    comparisons = [
        f"`{c}` vs `{scratch[p]}`: {_seed_wins(result, c, scratch[p])} seeds with higher mean accuracy"
        for p, c in points.get("fewshot", [])
        if p in scratch
    ]
    if comparisons:
        lines += ["", "Fewshot against scratch on the same pairs: " + "; ".join(comparisons) + "."]
    return lines + ["", f"![mean accuracy and FID against the number of pairs]({FIGURE})", ""]


def plot_fewshot(path: Path, config: CompareConfig, result: CompareResult) -> Path | None:
    """Two panels (mean accuracy, FID) against the number of pairs (log axis): one line per arm with
    std-over-seeds error bars, the references as horizontal lines. None (nothing written) without arms."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from trainers.compare.plots import _save

    points = arm_points(result)
    if not points:
        return None
    fig = Figure(figsize=(10.0, 4.0))
    axes = fig.subplots(1, 2)
    styles = {"fewshot": ("C0", "o"), "scratch": ("C1", "s"), "semi": ("C2", "^")}
    for ax, (metric, label) in zip(axes, PANELS, strict=True):
        for kind, kind_points in points.items():
            xs = [p for p, _ in kind_points]
            stats = [result.summary[c][metric] for _, c in kind_points]
            means = [np.nan if s["mean"] is None else s["mean"] for s in stats]
            errors = [s["std"] or 0.0 for s in stats]
            colour, marker = styles[kind]
            ax.errorbar(xs, means, yerr=errors, color=colour, marker=marker, capsize=3, label=kind)
        for i, (ref_label, condition) in enumerate(references(config, result).items()):
            value = result.summary[condition][metric]["mean"]
            if value is not None:
                style = ("--", ":")[i % 2]
                ax.axhline(value, color="0.3", ls=style, lw=1.2, label=f"{ref_label} ({condition})")
        ax.set_xscale("log")
        ticks = sorted({p for kind_points in points.values() for p, _ in kind_points})
        ax.set_xticks(ticks, [f"{p:,}" for p in ticks])  # the P measured, not log decades
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("real image-caption pairs P")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{config.generator} {config.size}, {config.steps:,} steps x {config.batch_size} per run; "
        f"seeds {', '.join(map(str, config.seeds))}",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def fewshot_summary(config: CompareConfig, result: CompareResult) -> dict[str, Any]:
    """results.json's few-shot block: the points per arm and each condition's gap closed."""
    return {
        "arms": {
            kind: [{"pairs": p, "condition": c} for p, c in points]
            for kind, points in arm_points(result).items()
        },
        "references": references(config, result),
        "gap_closed": {c: gap_closed(config, result, c) for c in result.summary},
    }
