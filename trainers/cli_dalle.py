"""The DALL-E family's commands (registered in trainers/cli.py): `dvae` (trainers/train_dvae.py; with
--encode, the token cache of trainers/tokens.py) and `dalle` (trainers/train_dalle.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli_common import user_errors


@user_errors
def dvae_command(
    cache: Annotated[Path | None, typer.Option("--cache", help="Feature cache (its images).")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Runs directory; the run goes to OUT/{idx:03d}-{name}/. (default: runs)"),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name. (default: dvae)")] = None,
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            help="trainers.dvae.DVAE_SIZES entry: tiny (tests), small (x4 down, 512 codes), small8 (x8 "
            "down, 512 codes). (default: small)",
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Total steps (a resume continues to it). (default: 20000)")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Images per step (or per --encode batch). (default: 32)"),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Adam learning rate. (default: 0.001)")] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Init, gumbel noise, data order, held-out choice. (default: 0)"),
    ] = None,
    kl_weight: Annotated[
        float | None,
        typer.Option(
            "--kl-weight", help="Weight of the KL to the uniform prior, once warmed up. (default: 0.02)"
        ),
    ] = None,
    kl_warmup: Annotated[
        int | None,
        typer.Option(
            "--kl-warmup", help="Steps of the linear KL-weight warm-up. (default: a quarter of --steps)"
        ),
    ] = None,
    tau_end: Annotated[
        float | None,
        typer.Option("--tau-end", help="Final gumbel-softmax temperature (from 1). (default: 0.0625)"),
    ] = None,
    anneal_steps: Annotated[
        int | None,
        typer.Option("--anneal-steps", help="Steps of the temperature annealing. (default: half of --steps)"),
    ] = None,
    eval_n: Annotated[
        int | None, typer.Option("--eval-n", help="Held-out images for eval.json. (default: 64)")
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option("--checkpoint-every", help="Steps between checkpoints (0: end only). (default: 5000)"),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Checkpoint, or run directory (its latest), to continue in place."),
    ] = None,
    allow_partial: Annotated[
        bool,
        typer.Option("--allow-partial", help="Train on the usable shards of a partially made cache."),
    ] = False,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N. (default: auto)")
    ] = None,
    encode: Annotated[
        Path | None,
        typer.Option(
            "--encode",
            help="Instead of training: the image tokens of this `trainers dvae` checkpoint (or run "
            "directory) for every embed shard, into CACHE/tokens/{dvae_id}/, which `trainers dalle` "
            "reads. Only stale or new shards are encoded; uses --batch-size (default 64) and --device. "
            "One process (not torchrun).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
) -> None:
    """Train DALL-E's discrete VAE (gumbel-softmax codes, KL to a uniform prior) on the cache's images.

    With --encode CKPT: write that dVAE's token cache for every embed shard once (no training).
    """
    from trainers.distributed import training_bar

    if encode is not None:
        from trainers.derived_shards import encode_command
        from trainers.tokens import describe, encode_tokens

        run = lambda advance: encode_tokens(cache, encode, batch_size or 64, device or "auto", advance)  # noqa: E731
        typer.echo(describe(encode_command("dvae", cache, run)))
        return
    from trainers.train_dvae import describe, resolve_config, run_dvae

    given = dict(
        cache=cache,
        out=out,
        name=name,
        size=size,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        kl_weight=kl_weight,
        kl_warmup=kl_warmup,
        tau_end=tau_end,
        anneal_steps=anneal_steps,
        eval_n=eval_n,
        checkpoint_every=checkpoint_every,
        allow_partial=allow_partial or None,  # not given: a resumed run keeps its own
        device=device,
    )
    config, checkpoint = resolve_config({k: v for k, v in given.items() if v is not None}, resume)
    config.validate()
    if dry_run:
        typer.echo(json.dumps(config.to_dict(), indent=1))
        return
    with training_bar("dvae", config.steps) as advance:
        result = run_dvae(config, advance, resume_state=checkpoint)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if not result.losses:
        typer.echo(f"dvae: already at step {result.step:,} of {config.steps:,} -> {result.run_dir}")
        return
    typer.echo(describe(result))


def _opt(flag: str, help: str, default: object = None):
    """An option that defaults to None (the config decides) and says the config's default in its help."""
    said = "" if default is None else f" (default: {default})"
    return typer.Option(flag, help=help + said)


@user_errors
def dalle_command(
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Feature cache (images + conditions).")
    ] = None,
    dvae: Annotated[
        Path | None,
        typer.Option("--dvae", help="A `trainers dvae` checkpoint or run directory (its latest), frozen."),
    ] = None,
    out: Annotated[
        Path | None, _opt("--out", "Runs directory; the run goes to OUT/{idx:03d}-{name}/.", "runs")
    ] = None,
    name: Annotated[str | None, _opt("--name", "Run name.", "dalle")] = None,
    size: Annotated[
        str | None, _opt("--size", "trainers.dalle.DALLE_SIZES entry: tiny (tests), small, base.", "small")
    ] = None,
    condition: Annotated[
        str | None, _opt("--condition", "optimize, retrieve, perturb or caption.", "optimize")
    ] = None,
    steps: Annotated[int | None, _opt("--steps", "Total steps (a resume continues to it).", 50000)] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", "Images per step.", 64)] = None,
    lr: Annotated[float | None, _opt("--lr", "AdamW peak learning rate.", 0.0003)] = None,
    weight_decay: Annotated[
        float | None, _opt("--weight-decay", "AdamW weight decay of matrices and embeddings.", 0.1)
    ] = None,
    warmup: Annotated[int | None, _opt("--warmup", "Linear warm-up steps, then cosine to 0.", 1000)] = None,
    seed: Annotated[int | None, _opt("--seed", "Init, condition dropout and data order.", 0)] = None,
    cond_drop: Annotated[
        float | None,
        _opt("--cond-drop", "Share of samples trained with the null condition (for guidance).", 0.1),
    ] = None,
    n_prefix: Annotated[
        int | None, _opt("--n-prefix", "Prefix slots the condition feature is projected to.", 4)
    ] = None,
    paired_fraction: Annotated[
        float | None, _opt("--paired-fraction", "Share of samples given real-caption features.", 0)
    ] = None,
    paired_limit: Annotated[
        int | None,
        typer.Option(
            "--paired-limit",
            help="Few-shot: N real image-caption pairs, seeded by --seed and listed in the run's pairs.txt.",
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init", help="Start a new run from this `trainers dalle` checkpoint's weights (fine-tuning)."
        ),
    ] = None,
    guidance: Annotated[
        float | None, _opt("--guidance", "Sampling default recorded for grids, sample and eval.", 3.0)
    ] = None,
    temperature: Annotated[float | None, _opt("--temperature", "Sampling default.", 1.0)] = None,
    top_k: Annotated[int | None, _opt("--top-k", "Sampling default; 0 keeps every token.", 0)] = None,
    top_p: Annotated[float | None, _opt("--top-p", "Sampling default; 1 keeps every token.", 1.0)] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Checkpoint, or run directory (its latest), to continue in place."),
    ] = None,
    checkpoint_every: Annotated[
        int | None, _opt("--checkpoint-every", "Steps between checkpoints (0: end only).", 5000)
    ] = None,
    log_every: Annotated[int | None, _opt("--log-every", "Steps between metrics.jsonl lines.", 10)] = None,
    sample_every: Annotated[
        int | None, _opt("--sample-every", "Steps between sample grids (0: end only).", 1000)
    ] = None,
    allow_partial: Annotated[
        bool,
        typer.Option("--allow-partial", help="Train on the usable shards of a partially made cache."),
    ] = False,
    workers: Annotated[int | None, _opt("--workers", "Loader processes.", 0)] = None,
    device: Annotated[str | None, _opt("--device", "auto, cpu, cuda or cuda:N.", "auto")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
) -> None:
    """Train the language-free DALL-E transformer on a frozen `trainers dvae`'s image tokens (the token
    cache of `trainers dvae --encode`, else encoded on the fly), conditioned on the cache's features."""
    from trainers.distributed import training_bar
    from trainers.train_dalle import describe, resolve_config, run_dalle

    given = dict(
        cache=cache,
        dvae=dvae,
        out=out,
        name=name,
        size=size,
        condition=condition,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        seed=seed,
        cond_drop=cond_drop,
        n_prefix=n_prefix,
        paired_fraction=paired_fraction,
        paired_limit=paired_limit,
        init=init,
        guidance=guidance,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        sample_every=sample_every,
        allow_partial=allow_partial or None,  # not given: a resumed run keeps its own
        workers=workers,
        device=device,
    )
    config, checkpoint = resolve_config({k: v for k, v in given.items() if v is not None}, resume)
    config.validate()
    if dry_run:
        typer.echo(json.dumps(config.to_dict(), indent=1))
        return
    with training_bar("dalle", config.steps) as advance:
        result = run_dalle(config, resume_state=checkpoint, progress=advance)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if not result.losses:
        typer.echo(f"dalle: already at step {result.step:,} of {config.steps:,} -> {result.run_dir}")
        return
    typer.echo(describe(result))
