"""Benchmark the offline CLIP recipe: which bundled config and batch recipe sees every attribute, how fast.

Each arm trains `trainers clip` on its own fresh synthetic stream (no --data) with the arm's config and
reports wall seconds (rendering the pairs + training; the evaluation is not counted) and the held-out
zero-shot accuracy per attribute: class prompts on single-object images (the issue's target, >= 0.90
each in <= 5 minutes on 2 CPU cores) and caption swap per object slot on two-object images. The baseline
in the same run is the recipe the project had: the lafite-tiny ViT with independent random batches.

    python benchmarks/bench_clip.py                                  # every arm, the default budget
    python benchmarks/bench_clip.py --arms rn32-g3,tiny-g1 --steps 3000
    python benchmarks/bench_clip.py --arms rn32-g3 --steps 20 --pretrain-n 300 --eval-n 40   # wiring

Rows are appended to benchmarks/results/clip.csv (date, commit, device, arm, model, contrast_group,
max_objects, steps, batch, pretrain_n, seconds_render, seconds_train, zero-shot per attribute, two-object
slot accuracy per attribute, min_single) through benchmarks/common.py.
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
# arm -> ClipTrainConfig overrides. g = scenes per contrast group (1: independent pairs), o = objects.
ARMS: dict[str, dict] = {
    "tiny-g1": dict(size="tiny", contrast_group=1),  # the baseline: the old config, random batches
    "tiny-g3": dict(size="tiny", contrast_group=3),  # the old config (ViT, 8 px patches) with groups
    "rn32-g1": dict(size="rn32", contrast_group=1),
    "rn32-g3": dict(size="rn32", contrast_group=3),  # the default
    "rn32-g6": dict(size="rn32", contrast_group=6),
    "rn32-g3-o2": dict(size="rn32", contrast_group=3, max_objects=2),
}


def run_arm(name: str, args: argparse.Namespace) -> dict:
    from trainers.clip_config import ClipTrainConfig
    from trainers.clip_train import train_clip

    overrides = ARMS[name]
    with tempfile.TemporaryDirectory() as out:
        config = ClipTrainConfig(
            out=Path(out),
            steps=args.steps,
            batch_size=args.batch_size,
            pretrain_n=args.pretrain_n,
            eval_n=args.eval_n,
            device=args.device,
            **overrides,
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
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=129)
    parser.add_argument("--pretrain-n", type=int, default=40000)
    parser.add_argument("--eval-n", type=int, default=600)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
    rows = [run_arm(arm, args) for arm in arms]
    print_table(rows, ["arm", "model", "contrast_group", "max_objects", "steps", "seconds", *ATTRIBUTES])
    if not args.no_csv:
        print(f"rows -> {append_rows('clip', rows)}")
    return rows


if __name__ == "__main__":
    main()
