"""`trainers compare`, the command (its core: trainers/compare/run.py); registered on the `trainers` app in
cli/trainers.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import DeviceOpt, given_options, user_errors
from cli.options import ProbeOpt
from trainers.compare.config import CompareConfig


@user_errors
def compare_command(
    cache: Annotated[Path, typer.Option("--cache", help="Feature cache every run trains on.")],
    out: Annotated[
        Path, typer.Option("--out", help="Comparison directory: runs/, results.csv, report.md, figures.")
    ],
    generator: Annotated[
        str, typer.Option("--generator", help="gan, ldm (one shared VAE) or dalle (one shared dVAE).")
    ] = CompareConfig.generator,
    conditions: Annotated[
        str,
        typer.Option(
            "--conditions",
            help="Comma-separated: perturb, retrieve, optimize[:VARIANT], caption, and the arms fewshot:P "
            "(pre-train language-free, fine-tune on P real pairs), scratch:P (P pairs from scratch), "
            "semi:P (language-free with P pairs mixed in); P a count (20) or a fraction of the cache (0.01).",
        ),
    ] = ",".join(CompareConfig.conditions),
    seeds: Annotated[
        str, typer.Option("--seeds", help="Comma-separated seeds: one run per condition and seed.")
    ] = ",".join(map(str, CompareConfig.seeds)),
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="Budget: smoke (seconds, tests), cpu (~7 min on 2 cores for 2 conditions x 2 seeds), gpu.",
        ),
    ] = CompareConfig.preset,
    size: Annotated[
        str | None, typer.Option("--size", help="Generator size.", show_default="the preset's")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Steps of every run.", show_default="the preset's"),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Images per step of every run.", show_default="the preset's"),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Learning rate of every run.", show_default="the generator's"),
    ] = None,
    eval_n: Annotated[
        int | None,
        typer.Option(
            "--eval-n",
            help="Images `trainers eval` generates per run.",
            show_default="the preset's",
        ),
    ] = None,
    eval_seed: Annotated[
        int, typer.Option("--eval-seed", help="Eval prompts and noise, for every run.")
    ] = CompareConfig.eval_seed,
    probe: ProbeOpt = None,
    vae_size: Annotated[
        str | None,
        typer.Option("--vae-size", help="ldm, dalle: the shared VAE's or dVAE's size.", show_default=False),
    ] = None,
    vae_steps: Annotated[
        int | None,
        typer.Option("--vae-steps", help="ldm, dalle: the shared VAE's or dVAE's steps.", show_default=False),
    ] = None,
    space: Annotated[
        str | None,
        typer.Option(
            "--space",
            help="ldm: latent (the shared VAE's latents) or pixel (no VAE: the images themselves).",
            show_default="the preset's",
        ),
    ] = None,
    sample_steps: Annotated[
        int | None,
        typer.Option("--sample-steps", help="ldm: sampler steps in eval and samples.", show_default=False),
    ] = None,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Every run trains on the usable shards when some are being rewritten, stale or not made "
            "yet (without it: wait briefly, then refuse); each config.json and eval.json records the rows.",
        ),
    ] = CompareConfig.allow_partial,
    language_free: Annotated[
        str,
        typer.Option(
            "--language-free", help="Arms: what fewshot pre-trains on and semi mixes real captions into."
        ),
    ] = CompareConfig.language_free,
    finetune_share: Annotated[
        float,
        typer.Option("--finetune-share", help="fewshot arms: the share of the budget spent on the P pairs."),
    ] = CompareConfig.finetune_share,
    device: DeviceOpt = CompareConfig.device,
    features_only: Annotated[
        bool,
        typer.Option(
            "--features-only", help="Only the feature-level table and histograms (seconds, no training)."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved config and which runs would run, and exit.")
    ] = False,
) -> None:
    """One generator per (condition, seed) at the same budget, the same eval for each, and a report.

    Each run is committed with a manifest: a rerun makes only the missing or stale runs.
    """
    given = given_options(locals(), "preset", "generator", "conditions", "seeds", "features_only", "dry_run")
    from trainers.compare import run as compare
    from trainers.compare.config import parse_list
    from trainers.compare.features import features_only as feature_report

    config = CompareConfig.from_preset(
        preset,
        generator,
        conditions=parse_list(conditions, "--conditions"),
        seeds=parse_list(seeds, "--seeds", int),
        **given,
    )
    config.validate()
    if dry_run:
        typer.echo(json.dumps(config.to_dict(), indent=1))
        plan = compare.plan_compare(config)
        for name, reason in plan.reasons.items():
            typer.echo(f"{name}: {'up to date' if reason is None else 'would run: ' + reason}")
        return
    if features_only:
        report = feature_report(config)
        table = Path(config.out) / "features.md"
        typer.echo(table.read_text() if table.is_file() else json.dumps(report, indent=1))
        typer.echo(f"compare --features-only -> {config.out}")
        return
    with compare.compare_progress() as advance:
        result = compare.run_compare(config, advance)
    typer.echo(compare.describe(result))
