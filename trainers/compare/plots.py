"""The comparison's figures: mean attribute accuracy per condition with the seed spread
(accuracy_bars.png), and each condition's samples side by side (samples.png)."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from manifests import write_bytes_atomic
from world.attribute_precision import ATTRIBUTES  # what the probe reads, in table order

if TYPE_CHECKING:
    from trainers.compare.config import CompareConfig, CompareResult


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def plot_accuracy(path: Path, config: CompareConfig, result: CompareResult) -> Path:
    """Grouped bars: attribute on x, one bar per condition (error bars: std over seeds), chance as a
    dashed line and real images as a dotted one over each group."""
    from matplotlib.figure import Figure

    attributes = (*ATTRIBUTES, "all")
    conditions = list(config.conditions)
    fig = Figure(figsize=(1.6 + 1.5 * len(attributes), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / len(conditions)
    for i, condition in enumerate(conditions):
        summary = result.summary[condition]
        means = [summary[f"acc_{a}"]["mean"] or 0.0 for a in attributes]
        errors = [summary[f"acc_{a}"]["std"] or 0.0 for a in attributes]
        x = np.arange(len(attributes)) - 0.4 + width * (i + 0.5)
        ax.bar(x, means, width * 0.9, yerr=errors, capsize=3, label=condition, color=f"C{i}")
    for j, a in enumerate(attributes):
        span, chance = (j - 0.45, j + 0.45), result.chance.get("acc", {}).get(a)
        if chance is not None:
            ax.plot(span, [chance] * 2, "k--", lw=1.2, label="chance" if j == 0 else None)
        if result.real.get(f"acc_{a}") is not None:
            ax.plot(
                span,
                [result.real[f"acc_{a}"]] * 2,
                ":",
                color="0.4",
                lw=1.5,
                label="real images" if j == 0 else None,
            )
    ax.set_xticks(np.arange(len(attributes)), attributes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("attribute accuracy of generated images")
    ax.set_title(
        f"{config.generator} {config.size}, {config.steps:,} steps x {config.batch_size}; "
        f"seeds {', '.join(map(str, config.seeds))}",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_samples(path: Path, config: CompareConfig, samples: dict[str, list[Path]]) -> Path:
    """One row per sample prompt, one column per condition (the first seed's run)."""
    from matplotlib.figure import Figure
    from PIL import Image

    prompts, conditions = list(config.prompts), list(config.conditions)
    cell_in = 1.3
    fig = Figure(figsize=(2.4 + cell_in * len(conditions), 0.5 + cell_in * len(prompts)))
    axes = fig.subplots(len(prompts), len(conditions), squeeze=False)
    for col, condition in enumerate(conditions):
        files = samples.get(condition, [])
        for row, prompt in enumerate(prompts):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row < len(files) and files[row].is_file():
                with Image.open(files[row]) as image:
                    ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
            if row == 0:
                ax.set_title(condition, fontsize=9)
            if col == 0:
                ax.set_ylabel(
                    "\n".join(textwrap.wrap(prompt, 22)), rotation=0, ha="right", va="center", fontsize=7
                )
    left = 2.2 / (2.4 + cell_in * len(conditions))
    fig.subplots_adjust(left=left, right=0.98, top=0.92, bottom=0.02, wspace=0.06, hspace=0.08)
    return _save(fig, path)
