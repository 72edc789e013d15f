"""Benchmark the offline CLIP recipe: which bundled config, batch recipe, caption style and temperature
sees every attribute with a real modality gap, how fast.

Each arm trains `trainers clip` on its own fresh synthetic stream (no --data) with the arm's config and
reports wall seconds (rendering the pairs + training; the evaluation is not counted), the held-out
zero-shot accuracy per attribute (class prompts on single-object images: the attribute alone in the
partial world; target >= 0.90 each in <= 5 minutes on 2 CPU cores), caption swap per object slot on
two-object images, and the modality gap (cos(image, own caption), target 0.2-0.45; gap vector length,
target >= 0.5). The baseline in the same run is the current default recipe (`default`).

    python benchmarks/bench_clip.py                                  # every arm, the default budget
    python benchmarks/bench_clip.py --arms default,partial-t0.01,partial-learnt
    python benchmarks/bench_clip.py --arms default --steps 20 --pretrain-n 300 --eval-n 40   # wiring

Rows are appended to benchmarks/results/clip.csv (date, commit, device, arm, model, caption_style,
temperature, logit_scale, contrast_group, max_objects, steps, batch, pretrain_n, seconds_render,
seconds_train, zero-shot per attribute, two-object slot accuracy per attribute, min_single,
cos_image_own_caption, gap_vector) through benchmarks/common.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, print_table, stamp  # noqa: E402

ATTRIBUTES = ("shape", "colour", "size", "position")
LEARNT = dict(temperature=None, temperature_start=None)  # open_clip's learnt temperature: nothing to anneal
# arm -> ClipTrainConfig overrides. g = scenes per contrast group (1: independent pairs), o = objects.
ARMS: dict[str, dict] = {
    "default": dict(),  # the current default recipe: the same-run baseline
    # partial captions (re-drawn each step) at a learnt or fixed temperature; p = partial, t = temperature
    "partial-learnt": dict(caption_style="partial", **LEARNT),
    "partial-t0.01": dict(caption_style="partial", temperature=0.01, temperature_start=None),
    "partial-t0.02": dict(caption_style="partial", temperature=0.02, temperature_start=None),
    "partial-t0.03": dict(caption_style="partial", temperature=0.03, temperature_start=None),
    "partial-t0.01-g1": dict(
        caption_style="partial", temperature=0.01, temperature_start=None, contrast_group=1
    ),
    # the default before the warm start (issue 28, section 3's first comparison)
    "partial-t0.02-s2200": dict(
        caption_style="partial", temperature=0.02, temperature_start=None, steps=2200, pretrain_n=40000
    ),
    # the fixed 0.02 reached from a warmer start (--temperature-start), over the first half of the steps
    "partial-warm0.1": dict(
        caption_style="partial", temperature=0.02, temperature_start=0.1, pretrain_n=40000
    ),
    "partial-warm0.1-s2600": dict(
        caption_style="partial", temperature=0.02, temperature_start=0.1, steps=2600, pretrain_n=40000
    ),
    "full-g3": dict(caption_style="full", **LEARNT),  # the former recipe: full captions, no gap
    "tiny-g1": dict(size="tiny", contrast_group=1, caption_style="full"),  # the first recipe
    "tiny-g3": dict(size="tiny", contrast_group=3, caption_style="full"),  # ViT, 8 px patches, groups
    "rn32-g1": dict(size="rn32", contrast_group=1, caption_style="full"),
    "rn32-g6": dict(size="rn32", contrast_group=6, caption_style="full"),
    "rn32-g3-o2": dict(size="rn32", contrast_group=3, max_objects=2, caption_style="full"),
}


def temperature_label(config) -> str | float:
    """The CSV's temperature: a number, `learnt`, or `START->END` for an annealed one."""
    if config.temperature is None:
        return "learnt"
    if config.temperature_start is not None:
        return f"{config.temperature_start}->{config.temperature}"
    return config.temperature


def run_arm(name: str, args: argparse.Namespace) -> dict:
    from trainers.clip.config import ClipTrainConfig
    from trainers.clip.train import train_clip

    overrides = ARMS[name]
    with tempfile.TemporaryDirectory() as out:
        budget = {"steps": args.steps, "batch_size": args.batch_size, "pretrain_n": args.pretrain_n}
        given = {k: v for k, v in budget.items() if v is not None}
        config = ClipTrainConfig(
            out=Path(out), eval_n=args.eval_n, device=args.device, **{**given, **overrides}
        )
        t0 = time.perf_counter()
        result = train_clip(config)
        wall = time.perf_counter() - t0
    ev = result.evaluation
    row = {
        **stamp(args.device),
        "arm": name,
        "model": ev["model"],
        "contrast_group": config.contrast_group,
        "max_objects": config.max_objects,
        "caption_style": config.caption_style,
        "temperature": temperature_label(config),
        "logit_scale": ev["logit_scale"],
        "steps": config.steps,
        "batch": ev["batch_size"],
        "pretrain_n": ev["pairs"],
        "seconds_render": ev["seconds"]["read"],
        "seconds_train": ev["seconds"]["train"],
        "seconds": round(ev["seconds"]["read"] + ev["seconds"]["train"], 1),
        "seconds_with_eval": round(wall, 1),
    }
    for attribute in ATTRIBUTES:
        row[attribute] = ev["zero_shot"][attribute]
    for slot in ("object_1", "object_2"):
        for attribute in ATTRIBUTES:
            row[f"{slot}_{attribute}"] = ev["zero_shot_two_objects"].get(slot, {}).get(attribute)
    row["min_single"] = min(ev["zero_shot"][a] for a in ATTRIBUTES)
    gap = ev.get("modality_gap") or {}
    row["cos_image_own_caption"] = gap.get("cos_image_own_caption")
    row["gap_vector"] = gap.get("gap_vector_length")
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--pretrain-n", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--eval-n", type=int, default=600)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
    rows = [run_arm(arm, args) for arm in arms]
    columns = ["arm", "model", "caption_style", "temperature", "contrast_group", "steps", "seconds"]
    print_table(rows, [*columns, *ATTRIBUTES, "cos_image_own_caption", "gap_vector"])
    if not args.no_csv:
        print(f"rows -> {append_rows('clip', rows)}")
    return rows


if __name__ == "__main__":
    main()
