"""The DALL-E family's commands (registered in cli/trainers.py): `dvae` (trainers/autoencoders/dvae/train.py;
with
--encode, the token cache of trainers/autoencoders/dvae/encode.py) and `dalle`
(trainers/families/dalle/train.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import given_options, user_errors
from cli.options import (
    STEP_COST,
    AcceptLossyOpt,
    BatchOpt,
    CheckpointEveryOpt,
    CompileOpt,
    ConditionOpt,
    DryRunOpt,
    GridPromptsOpt,
    LogEveryOpt,
    NameOpt,
    PairedFractionOpt,
    RunDeviceOpt,
    RunsOpt,
    SampleEveryOpt,
    TotalStepsOpt,
    WorkersOpt,
    shown,
    train,
    with_grid_prompts,
)

ResumeOpt = Annotated[
    Path | None,
    typer.Option("--resume", help="Checkpoint, or run directory (its latest), to continue in place."),
]
AllowPartialOpt = Annotated[
    bool, typer.Option("--allow-partial", help="Train on the usable shards of a partially made cache.")
]


@user_errors
def dvae_command(
    cache: Annotated[Path | None, typer.Option("--cache", help="Feature cache (its images).")] = None,
    out: RunsOpt = None,
    name: NameOpt = None,
    size: Annotated[
        str | None,
        shown(
            "--size",
            "dVAE size: tiny (x4 down, 64 codes), mini (x4, 512 codes: compare's cpu preset, keeps the "
            "objects at 32 px), small (x4, 512 codes), small8 (x8 down, 512 codes)."
            + STEP_COST
            + "tiny 0.03 at 32 px, small 0.73 and small8 0.64 at 64 px.",
        ),
    ] = None,
    quantizer: Annotated[
        str | None,
        shown(
            "--quantizer",
            "gumbel: a learnt codebook, gumbel-softmax codes and a KL to the uniform prior (DALL-E); fsq: "
            "finite scalar quantisation (levels 8 x 8 for 64 codes, 8 x 8 x 8 for 512), MSE alone.",
        ),
    ] = None,
    steps: TotalStepsOpt = None,
    batch_size: Annotated[
        int | None, shown("--batch-size", "Images per step (or per --encode batch).")
    ] = None,
    lr: Annotated[float | None, shown("--lr", "Adam learning rate.")] = None,
    seed: Annotated[int | None, shown("--seed", "Init, gumbel noise, data order, held-out choice.")] = None,
    kl_weight: Annotated[
        float | None, shown("--kl-weight", "Weight of the KL to the uniform prior, once warmed up.")
    ] = None,
    kl_warmup: Annotated[
        int | None,
        typer.Option(
            "--kl-warmup",
            help="Steps of the linear KL-weight warm-up.",
            show_default="a quarter of --steps",
        ),
    ] = None,
    tau_end: Annotated[float | None, shown("--tau-end", "Final gumbel-softmax temperature (from 1).")] = None,
    anneal_steps: Annotated[
        int | None,
        typer.Option(
            "--anneal-steps", help="Steps of the temperature annealing.", show_default="half of --steps"
        ),
    ] = None,
    eval_n: Annotated[int | None, shown("--eval-n", "Held-out images for eval.json.")] = None,
    checkpoint_every: CheckpointEveryOpt = None,
    log_every: LogEveryOpt = None,
    resume: ResumeOpt = None,
    allow_partial: AllowPartialOpt = False,
    device: RunDeviceOpt = None,
    encode: Annotated[
        Path | None,
        typer.Option(
            "--encode",
            help="Instead of training: the image tokens of this `trainers dvae` checkpoint (or run "
            "directory) for every embed shard, into CACHE/tokens/{dvae_id}/, which `trainers dalle` "
            "reads. Only stale or new shards are encoded; uses --batch-size (64 unless given) and --device. "
            "One process (not torchrun).",
            show_default=False,
        ),
    ] = None,
    accept_lossy: AcceptLossyOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Train DALL-E's discrete VAE (gumbel-softmax codes, KL to a uniform prior) on the cache's images.

    With --encode CKPT: write that dVAE's token cache for every embed shard once (no training).
    """
    given = given_options(locals(), "resume", "encode", "accept_lossy", "dry_run")
    if encode is not None:
        from cli.options import encode_command
        from trainers.autoencoders.dvae.encode import describe, encode_tokens

        batch, dev = batch_size or 64, device or "auto"
        run = lambda advance: encode_tokens(cache, encode, batch, dev, advance)  # noqa: E731
        typer.echo(describe(encode_command("dvae", cache, run, encode, batch, dev, accept_lossy)))
        return
    from trainers.autoencoders.dvae.train import describe, resolve_config, run_dvae

    result = train("dvae", resolve_config, run_dvae, given, resume, dry_run=dry_run)
    if result is not None:
        typer.echo(describe(result))


@user_errors
def dalle_command(
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Feature cache (images + conditions).")
    ] = None,
    dvae: Annotated[
        Path | None,
        typer.Option("--dvae", help="A `trainers dvae` checkpoint or run directory (its latest), frozen."),
    ] = None,
    out: RunsOpt = None,
    name: NameOpt = None,
    size: Annotated[
        str | None,
        shown(
            "--size",
            "trainers.families.dalle.model.DALLE_SIZES entry: tiny, mini, small, base."
            + STEP_COST
            + "tiny 0.02 and mini 0.20 "
            "(the CPU size) on 8 x 8 tokens, small 12 and base 36 on 16 x 16.",
        ),
    ] = None,
    condition: ConditionOpt = None,
    steps: TotalStepsOpt = None,
    batch_size: BatchOpt = None,
    lr: Annotated[float | None, shown("--lr", "AdamW peak learning rate.")] = None,
    weight_decay: Annotated[
        float | None, shown("--weight-decay", "AdamW weight decay of matrices and embeddings.")
    ] = None,
    warmup: Annotated[int | None, shown("--warmup", "Linear warm-up steps, then cosine to 0.")] = None,
    seed: Annotated[int | None, shown("--seed", "Init, condition dropout and data order.")] = None,
    cond_drop: Annotated[
        float | None, shown("--cond-drop", "Share of samples trained with the null condition (for guidance).")
    ] = None,
    dropout: Annotated[
        float | None,
        shown("--dropout", "Dropout of the embeddings, attention weights and residual branches."),
    ] = None,
    n_prefix: Annotated[
        int | None, shown("--n-prefix", "Prefix slots the condition feature is projected to.")
    ] = None,
    paired_fraction: PairedFractionOpt = None,
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
        float | None, shown("--guidance", "Sampling default recorded for grids, sample and eval.")
    ] = None,
    temperature: Annotated[float | None, shown("--temperature", "Sampling default.")] = None,
    top_k: Annotated[int | None, shown("--top-k", "Sampling default; 0 keeps every token.")] = None,
    top_p: Annotated[float | None, shown("--top-p", "Sampling default; 1 keeps every token.")] = None,
    resume: ResumeOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    log_every: LogEveryOpt = None,
    sample_every: SampleEveryOpt = None,
    prompts: GridPromptsOpt = None,
    allow_partial: AllowPartialOpt = False,
    workers: WorkersOpt = None,
    device: RunDeviceOpt = None,
    compile: CompileOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Train the language-free DALL-E transformer on a frozen `trainers dvae`'s image tokens (the token
    cache of `trainers dvae --encode`, else encoded on the fly), conditioned on the cache's features."""
    given = with_grid_prompts(given_options(locals(), "resume", "prompts", "dry_run"), prompts)
    from trainers.families.dalle.train import describe, resolve_config, run_dalle

    result = train("dalle", resolve_config, run_dalle, given, resume, dry_run=dry_run)
    if result is not None:
        typer.echo(describe(result))
