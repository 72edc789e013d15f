"""The `trainers` command: generators trained from the frozen feature cache, one thin command each.

Commands turn options into a config and call the core in its module: `gan` (trainers/families/gan/train.py),
`vae` (vae.py), `ldm` (train_ldm.py), `sample` (sample.py), `eval` (evaluate.py); `clip`
(clip_train.py) and `probe` (probe.py) have their commands in cli/trainers_instruments.py, `compare`
(compare.py) in cli/trainers_compare.py, `dvae` (train_dvae.py, tokens.py) in cli/trainers_dalle.py.
The options several commands share, how a trainer's --help says its config's defaults, and the body of
the resumable trainers' commands are in cli/options.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DEVICE_HELP, DeviceOpt, ThreadsOpt, given_options, user_errors
from cli.help import ordered_group
from cli.options import (
    BATCH_HELP,
    CHECKPOINTS_HELP,
    NAME_HELP,
    RUNS_HELP,
    STEP_COST,
    AcceptLossyOpt,
    AllowPartialOpt,
    BatchOpt,
    CheckpointEveryOpt,
    CompileOpt,
    ConditionOpt,
    DryRunOpt,
    GridPromptsOpt,
    InitOpt,
    LogEveryOpt,
    NameOpt,
    PairedFractionOpt,
    PairedLimitOpt,
    ProbeOpt,
    RunDeviceOpt,
    RunsOpt,
    SampleEveryOpt,
    TotalStepsOpt,
    WorkersOpt,
    defaults_from,
    shown,
    train,
    with_grid_prompts,
)
from cli.trainers_compare import compare_command
from cli.trainers_dalle import dalle_command, dvae_command
from cli.trainers_instruments import clip_command, probe_command
from trainers.eval.sample import SampleConfig

COMMAND_ORDER = ("clip", "probe", "gan", "vae", "ldm", "dvae", "dalle", "sample", "eval", "compare")  # as run

app = typer.Typer(
    cls=ordered_group(COMMAND_ORDER),
    help="Train generators from the frozen feature cache: clip, probe, gan, vae, ldm, dvae, dalle, sample, "
    "eval, compare.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # as `pipeline`: docstring paragraphs re-flow, not keep source line breaks
)


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context, threads: ThreadsOpt = None) -> None:
    from core.processes import start_threads

    start_threads(threads)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@app.command(cls=defaults_from("trainers.families.gan.config:GanConfig"))
@user_errors
def gan(
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Feature cache (pipeline embed, + retrieve/optimize).")
    ] = None,
    out: RunsOpt = None,
    name: NameOpt = None,
    size: Annotated[
        str | None,
        shown(
            "--size",
            "GAN size (trainers/families/gan/model.py), for images of: tiny 32 px, small 64 px, base "
            "128-256 px (the image size is the cache's)."
            + STEP_COST
            + "tiny 0.11 (the CPU size), small 9.3, base 57 at 128 px.",
        ),
    ] = None,
    condition: ConditionOpt = None,
    steps: TotalStepsOpt = None,
    batch_size: BatchOpt = None,
    lr: Annotated[
        float | None,
        shown("--lr", "Adam learning rate of G and D; unset: the size's (tiny 0.01, small and base 0.0025)."),
    ] = None,
    con_g_weight: Annotated[
        float | None, shown("--con-g-weight", "Weight of L_ConG (CLIP features of fakes vs their condition).")
    ] = None,
    con_d_weight: Annotated[
        float | None, shown("--con-d-weight", "Weight of L_ConD (D's features vs the condition).")
    ] = None,
    tau: Annotated[float | None, shown("--tau", "InfoNCE temperature of both contrastive terms.")] = None,
    seed: Annotated[int | None, shown("--seed", "Seed of init, noise and data order.")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Checkpoint, or run directory (its latest), to continue in place; the "
            "model, data and losses come from it.",
        ),
    ] = None,
    sample_every: SampleEveryOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    log_every: LogEveryOpt = None,
    paired_fraction: PairedFractionOpt = None,
    paired_limit: PairedLimitOpt = None,
    init: InitOpt = None,
    prompts: GridPromptsOpt = None,
    allow_partial: AllowPartialOpt = False,
    workers: WorkersOpt = None,
    device: RunDeviceOpt = None,
    compile: CompileOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Train the LAFITE-style conditional StyleGAN2-lite on the cache's images and conditions."""
    given = with_grid_prompts(given_options(locals(), "resume", "prompts", "dry_run"), prompts)
    from trainers.families.gan.train import resolve_config, run_gan

    result = train(
        "gan",
        resolve_config,
        run_gan,
        given,
        resume,
        dry_run=dry_run,
        bar=False,  # run_gan shows its own, with the losses
        already="; raise --steps to continue",
    )
    if result is None:
        return
    losses = ", ".join(f"{k} {result.losses[k]:.3f}" for k in ("loss_g", "loss_d", "con_g", "con_d"))
    typer.echo(
        f"gan: step {result.step:,}, {result.images_per_s:,.1f} img/s; {losses} -> {result.checkpoint}"
    )


SamplerStepsOpt = Annotated[int | None, typer.Option("--steps", help="LDM sampler steps.", show_default="50")]
GuidanceOpt = Annotated[
    float | None,
    typer.Option("--guidance", help="LDM or DALL-E classifier-free guidance.", show_default="the run's"),
]


@app.command()
@user_errors
def sample(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint", help="A `trainers gan`, `ldm` or `dalle` checkpoint, or a run directory."
        ),
    ],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="A prompt (repeatable): one grid row.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="A file of prompts, one per line.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Images per prompt.")] = SampleConfig.n,
    seed: Annotated[
        int, typer.Option("--seed", help="Same checkpoint, prompts and seed: same pixels.")
    ] = SampleConfig.seed,
    out: Annotated[
        Path, typer.Option("--out", help="Grid PNG; single images go into a folder named after it.")
    ] = SampleConfig.out,
    device: DeviceOpt = SampleConfig.device,
    steps: SamplerStepsOpt = SampleConfig.steps,
    guidance: GuidanceOpt = SampleConfig.guidance,
    rerank: Annotated[
        int,
        typer.Option(
            "--rerank",
            help="CLIP re-ranking: each image is the best of N candidates by CLIP score with the "
            "checkpoint's CLIP (DALL-E's); 1: off.",
        ),
    ] = SampleConfig.rerank,
) -> None:
    """Prompts -> CLIP text features -> a labelled image grid (one row per prompt) and single images;
    `--rerank N` shows the best of N candidates per cell by CLIP score, for any generator family."""
    given = given_options(locals(), "prompt", "prompts")
    from trainers.eval.evaluate import read_prompts  # its errors name an undecodable or empty file
    from trainers.eval.sample import run_sample

    texts = tuple(prompt or ()) + (tuple(read_prompts(prompts)) if prompts is not None else ())
    config = SampleConfig(**given, prompts=texts)
    result = run_sample(config)
    typer.echo(
        f"sample: {len(result.images)} images at {result.resolution}px from step {result.step:,} -> "
        f"{result.grid} (+ {result.grid.with_suffix('')}/)"
    )
    if result.reranked is not None:
        score = (100 * result.reranked.scores).clip(min=0)  # [cells, N]: eval's CLIP score per candidate
        typer.echo(
            f"rerank: best of {rerank} by CLIP, mean CLIP score {score.max(axis=1).mean():.2f} "
            f"(one draw {score.mean():.2f})"
        )


@app.command("eval", cls=defaults_from("trainers.eval.config:EvalConfig"))
@user_errors
def eval_command(
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint", help="A generator checkpoint (or run directory) `trainers sample` can load."
        ),
    ],
    cache: Annotated[Path, typer.Option("--cache", help="The feature cache the generator was trained on.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for eval.json and grid.png.")],
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="Prompts, one per line.",
            show_default="synthetic-world captions; on a cache without world labels, its own captions",
        ),
    ] = None,
    n: Annotated[int | None, shown("--n", "Images generated (and real images compared).")] = None,
    seed: Annotated[int | None, shown("--seed", "Prompts, generator noise, real-image draw.")] = None,
    batch_size: Annotated[int | None, shown("--batch-size", "Images per generator call.")] = None,
    probe: ProbeOpt = None,
    inception: Annotated[
        Path | None,
        typer.Option(
            "--inception", help="Local inception-2015-12-05.pt for Inception FID (never downloaded)."
        ),
    ] = None,
    device: Annotated[str | None, shown("--device", DEVICE_HELP)] = None,
    steps: SamplerStepsOpt = None,
    guidance: GuidanceOpt = None,
    rerank: Annotated[
        int | None,
        shown(
            "--rerank",
            "Also measure the best of N candidates per image by CLIP score (eval.json `rerank`, "
            "grid_rerank.png); the plain metrics are unchanged. 1: off.",
        ),
    ] = None,
) -> None:
    """FID (CLIP features offline; Inception when its weights are local), CLIP score, attribute accuracy,
    each printed and written beside its reference: real images (FID: two halves of them) or chance;
    with `--rerank N` the same again on the best of N candidates per image by CLIP."""
    given = given_options(locals(), "steps", "guidance")
    from core.progress import progress_bar
    from trainers.eval.config import EvalConfig
    from trainers.eval.evaluate import describe, evaluate
    from trainers.families.load import load_generator

    config = EvalConfig(**{**given, "checkpoint": str(checkpoint)})
    config.validate()
    generate, info = load_generator(checkpoint, device=config.device, steps=steps, guidance=guidance)
    with progress_bar("eval", total=config.n * config.rerank) as advance:  # every candidate: one image
        result = evaluate(config, generate, info, progress=advance)
    typer.echo(f"{describe(result)} -> {out / 'eval.json'}")


@app.command("vae", cls=defaults_from("trainers.autoencoders.vae.config:VaeConfig"))
@user_errors
def vae_command(
    cache: Annotated[Path | None, typer.Option("--cache", help="Feature cache (its images).")] = None,
    out: Annotated[Path | None, shown("--out", RUNS_HELP)] = None,
    name: Annotated[str | None, shown("--name", NAME_HELP)] = None,
    size: Annotated[
        str | None,
        shown(
            "--size",
            "VAE size (trainers/autoencoders/vae/model.py): tiny, mini (compare's cpu preset: keeps the "
            "objects at 32 px) or small." + STEP_COST + "tiny and mini 0.08 at 32 px, small 1.3 at 64 px "
            "(24 at 256 px).",
        ),
    ] = None,
    steps: Annotated[int | None, shown("--steps", "Optimisation steps.")] = None,
    batch_size: Annotated[int | None, shown("--batch-size", BATCH_HELP)] = None,
    lr: Annotated[
        float | None,
        shown("--lr", "Adam learning rate; unset: the size's (tiny and mini 2e-3, small 2e-4)."),
    ] = None,
    recon_loss: Annotated[
        str | None, shown("--recon-loss", "The reconstruction term: l1 or mse (per pixel, mean).")
    ] = None,
    seed: Annotated[int | None, shown("--seed", "Init, noise, data order, held-out choice.")] = None,
    eval_n: Annotated[
        int | None, shown("--eval-n", "Held-out images for eval.json's PSNR and what the probe reads.")
    ] = None,
    disc_weight: Annotated[
        float | None,
        shown("--disc-weight", "Patch-discriminator (hinge) term weight; 0 trains without one."),
    ] = None,
    disc_start: Annotated[
        int | None, shown("--disc-start", "Warm-up: the first step with the discriminator terms.")
    ] = None,
    checkpoint_every: Annotated[int | None, shown("--checkpoint-every", CHECKPOINTS_HELP)] = None,
    log_every: Annotated[int | None, shown("--log-every", "Steps between metrics.jsonl lines.")] = None,
    allow_partial: AllowPartialOpt = False,
    device: Annotated[str | None, shown("--device", DEVICE_HELP)] = None,
    encode: Annotated[
        Path | None,
        typer.Option(
            "--encode",
            help="Instead of training: encode the cache's images with this `trainers vae` checkpoint (or "
            "run directory) into CACHE/latents/{vae_id}/, which `trainers ldm --vae` then reads. Only "
            "stale or new shards are encoded; uses --batch-size and --device. One process (not torchrun).",
            show_default=False,
        ),
    ] = None,
    accept_lossy: AcceptLossyOpt = False,
) -> None:
    """Train the KL autoencoder (x4 down, 4 latent channels) that `trainers ldm` works in.

    With --encode CKPT: precompute that VAE's latents of every embed shard once (no training).
    """
    given = given_options(locals(), "encode", "accept_lossy")
    from trainers.autoencoders.vae.config import VaeConfig
    from trainers.autoencoders.vae.train import run_vae
    from trainers.runtime.distributed import training_bar

    config = VaeConfig(**given)
    if encode is not None:
        from cli.options import encode_command
        from trainers.autoencoders.vae.encode import describe, encode_latents

        run = lambda advance: encode_latents(cache, encode, config.batch_size, config.device, advance)  # noqa: E731
        summary = encode_command("vae", cache, run, encode, config.batch_size, config.device, accept_lossy)
        typer.echo(describe(summary))
        return
    config.validate()
    with training_bar("vae", config.steps) as advance:
        result = run_vae(config, advance)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return
    from trainers.autoencoders.recon_probe import describe

    typer.echo(
        f"vae: step {result.step:,}, loss {result.losses['loss']:.4f}, {describe(result.reconstruction)} "
        f"-> {result.checkpoint}"
    )


@app.command("ldm", cls=defaults_from("trainers.families.ldm.config:LdmConfig"))
@user_errors
def ldm_command(
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Feature cache (images + conditions).")
    ] = None,
    vae: Annotated[
        Path | None,
        typer.Option("--vae", help="A `trainers vae` checkpoint or run directory (--space latent)."),
    ] = None,
    space: Annotated[
        str | None,
        shown(
            "--space",
            "latent: diffuse a frozen VAE's latents (--vae); pixel: the images themselves, no autoencoder "
            "(nothing lost to one; at 32 px the mini VAE's latents did better: BENCHMARKS.md).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help=RUNS_HELP)] = None,
    name: NameOpt = None,
    size: Annotated[
        str | None,
        shown(
            "--size",
            "trainers.families.ldm.model.LDM_SIZES entry: tiny, S or B."
            + STEP_COST
            + "tiny 0.02 at 32 px, S 2.5 and B 7.9 at "
            "64 px.",
        ),
    ] = None,
    condition: ConditionOpt = None,
    steps: Annotated[int | None, shown("--steps", "Total steps.")] = None,
    batch_size: BatchOpt = None,
    lr: Annotated[
        float | None, shown("--lr", "AdamW learning rate; unset: the size's (tiny 1e-3, S and B 1e-4).")
    ] = None,
    seed: Annotated[int | None, shown("--seed", "Seed.")] = None,
    init: InitOpt = None,
    paired_limit: PairedLimitOpt = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Checkpoint, or run directory (its latest), to continue.")
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", help=CHECKPOINTS_HELP)] = None,
    log_every: LogEveryOpt = None,
    prompts: GridPromptsOpt = None,
    allow_partial: AllowPartialOpt = False,
    workers: WorkersOpt = None,
    device: Annotated[str | None, typer.Option("--device", help=DEVICE_HELP)] = None,
    compile: CompileOpt = None,
) -> None:
    """Train the DiT-style rectified-flow model on a frozen `trainers vae`'s latents or on pixels, with
    guidance dropout."""
    given = with_grid_prompts(given_options(locals(), "resume", "prompts"), prompts)
    from trainers.families.ldm.train import resolve_config, run_ldm

    result = train("ldm", resolve_config, run_ldm, given, resume)
    if result is None:
        return
    typer.echo(
        f"ldm: step {result.step:,}, loss {result.losses['loss']:.4f}, {result.data['n_images']:,} images "
        f"({result.data['pairs']:,} pairs) -> {result.checkpoint}"
    )


app.command("clip", cls=defaults_from("trainers.clip.config:ClipTrainConfig"))(clip_command)
app.command("probe", cls=defaults_from("trainers.probe.config:ProbeConfig"))(probe_command)
app.command("compare")(compare_command)
app.command("dvae", cls=defaults_from("trainers.autoencoders.dvae.config:DvaeConfig"))(dvae_command)
app.command("dalle", cls=defaults_from("trainers.families.dalle.config:DalleConfig"))(dalle_command)


def main() -> None:
    app()
