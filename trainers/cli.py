"""The `trainers` command: generators trained from the frozen feature cache, one thin command each.

Commands turn options into a config and call the core in its module: `gan` (trainers/train_gan.py),
`vae` (vae.py), `ldm` (train_ldm.py), `sample` (sample.py), `eval` (evaluate.py); `clip`
(clip_train.py) and `probe` (probe.py) have their commands in trainers/cli_instruments.py, `compare`
(compare.py) in trainers/cli_compare.py, `dvae` (train_dvae.py, tokens.py) in trainers/cli_dalle.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli_common import ThreadsOpt, user_errors
from pipeline.help import ordered_group
from trainers.cli_compare import compare_command
from trainers.cli_dalle import dalle_command, dvae_command
from trainers.cli_instruments import clip_command, probe_command

COMMAND_ORDER = ("clip", "probe", "gan", "vae", "ldm", "dvae", "dalle", "sample", "eval", "compare")  # as run

app = typer.Typer(
    cls=ordered_group(COMMAND_ORDER),
    help="Train generators from the frozen feature cache: clip, probe, gan, vae, ldm, dvae, dalle, sample, "
    "eval, compare.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # as `pipeline`: docstring paragraphs re-flow, not keep source line breaks
)


AllowPartialOpt = Annotated[
    bool,
    typer.Option(
        "--allow-partial",
        help="Train on the usable shards when some are being rewritten, stale or not made yet (without "
        "it: wait briefly, then refuse); config.json records the rows used.",
    ),
]
PairedLimitOpt = Annotated[
    int | None,
    typer.Option(
        "--paired-limit",
        help="Few-shot: N real image-caption pairs, seeded by --seed and listed in the run's pairs.txt. "
        "With --condition caption the run trains on them alone; otherwise they keep their captions "
        "among the condition's features (semi-supervised).",
    ),
]
InitOpt = Annotated[
    Path | None,
    typer.Option(
        "--init",
        help="Start a new run from this checkpoint's weights (same generator and architecture; fresh "
        "optimiser, step 0): fine-tuning.",
    ),
]


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context, threads: ThreadsOpt = None) -> None:
    from pipeline.processes import start_threads

    start_threads(threads)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@app.command()
@user_errors
def gan(
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Feature cache (pipeline embed, + retrieve/optimize).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Runs directory; the run goes to OUT/{idx:03d}-{name}/. (default: runs)"),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name. (default: gan)")] = None,
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            help="trainers.gan.GAN_SIZES entry: tiny (tests, 32 px), small (64 px), "
            "base (128-256 px). (default: small)",
        ),
    ] = None,
    condition: Annotated[
        str | None,
        typer.Option("--condition", help="optimize, retrieve, perturb or caption. (default: optimize)"),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Total steps (a resume continues to it). (default: 20000)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Images per step. (default: 32)")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Adam learning rate of G and D. (default: 0.0025)")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of init, noise and data order. (default: 0)")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Checkpoint, or run directory (its latest), to continue in place; the "
            "model, data and losses come from it.",
        ),
    ] = None,
    sample_every: Annotated[
        int | None,
        typer.Option("--sample-every", help="Steps between sample grids (0: end only). (default: 1000)"),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option("--checkpoint-every", help="Steps between checkpoints (0: end only). (default: 5000)"),
    ] = None,
    paired_fraction: Annotated[
        float | None,
        typer.Option("--paired-fraction", help="Share of samples given real-caption features. (default: 0)"),
    ] = None,
    paired_limit: PairedLimitOpt = None,
    init: InitOpt = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts", help="Sample-grid prompts, one per line. (default: synthetic-world captions)"
        ),
    ] = None,
    allow_partial: AllowPartialOpt = False,
    workers: Annotated[int | None, typer.Option("--workers", help="Loader processes. (default: 0)")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N. (default: auto)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
) -> None:
    """Train the LAFITE-style conditional StyleGAN2-lite on the cache's images and conditions."""
    from trainers.evaluate import read_prompts  # its errors name an undecodable or empty file
    from trainers.train_gan import resolve_config, run_gan

    given = dict(
        cache=cache,
        out=out,
        name=name,
        size=size,
        condition=condition,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        sample_every=sample_every,
        checkpoint_every=checkpoint_every,
        paired_fraction=paired_fraction,
        paired_limit=paired_limit,
        init=init,
        allow_partial=allow_partial or None,  # not given: a resumed run keeps its own
        workers=workers,
        device=device,
    )
    given = {k: v for k, v in given.items() if v is not None}
    if prompts is not None:
        given["prompts"] = tuple(read_prompts(prompts))
    config, checkpoint = resolve_config(given, resume)
    if dry_run:
        config.validate()
        typer.echo(json.dumps(config.to_dict(), indent=1))
        return
    result = run_gan(config, resume_state=checkpoint)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if not result.losses:
        typer.echo(
            f"gan: already at step {result.step:,} of {config.steps:,}; raise --steps to continue "
            f"-> {result.run_dir}"
        )
        return
    losses = ", ".join(f"{k} {result.losses[k]:.3f}" for k in ("loss_g", "loss_d", "con_g", "con_d"))
    typer.echo(
        f"gan: step {result.step:,}, {result.images_per_s:,.1f} img/s; {losses} -> {result.checkpoint}"
    )


@app.command()
@user_errors
def sample(
    checkpoint: Annotated[
        Path,
        typer.Option("--checkpoint", help="A `trainers gan` or `ldm` checkpoint, or a run directory."),
    ],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="A prompt (repeatable): one grid row.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="A file of prompts, one per line.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Same checkpoint, prompts and seed: same pixels.")] = 0,
    out: Annotated[
        Path, typer.Option("--out", help="Grid PNG; single images go into a folder named after it.")
    ] = Path("samples.png"),
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    steps: Annotated[int | None, typer.Option("--steps", help="LDM sampler steps (default 50).")] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="LDM classifier-free guidance (default: the run's).")
    ] = None,
    rerank: Annotated[
        int,
        typer.Option(
            "--rerank",
            help="CLIP re-ranking: each image is the best of N candidates by CLIP score with the "
            "checkpoint's CLIP (DALL-E's); 1: off.",
        ),
    ] = 1,
) -> None:
    """Prompts -> CLIP text features -> a labelled image grid (one row per prompt) and single images;
    `--rerank N` shows the best of N candidates per cell by CLIP score, for any generator family."""
    from trainers.evaluate import read_prompts  # its errors name an undecodable or empty file
    from trainers.sample import SampleConfig, run_sample

    texts = tuple(prompt or ()) + (tuple(read_prompts(prompts)) if prompts is not None else ())
    config = SampleConfig(
        checkpoint=checkpoint,
        prompts=texts,
        out=out,
        n=n,
        seed=seed,
        device=device,
        steps=steps,
        guidance=guidance,
        rerank=rerank,
    )
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


@app.command("eval")
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
        typer.Option("--prompts", help="Prompts, one per line. (default: synthetic-world captions)"),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Images generated (and real images compared).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Prompts, generator noise, real-image draw.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per generator call.")] = 100,
    probe: Annotated[
        Path | None,
        typer.Option("--probe", help="A `trainers probe` file. (default: trained once per cache)"),
    ] = None,
    inception: Annotated[
        Path | None,
        typer.Option(
            "--inception", help="Local inception-2015-12-05.pt for Inception FID (never downloaded)."
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    steps: Annotated[int | None, typer.Option("--steps", help="LDM sampler steps (default 50).")] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="LDM classifier-free guidance (default: the run's).")
    ] = None,
    rerank: Annotated[
        int,
        typer.Option(
            "--rerank",
            help="Also measure the best of N candidates per image by CLIP score (eval.json `rerank`, "
            "grid_rerank.png); the plain metrics are unchanged. 1: off.",
        ),
    ] = 1,
) -> None:
    """FID (CLIP features offline; Inception when its weights are local), CLIP score, attribute accuracy,
    each printed and written beside its reference: real images (FID: two halves of them) or chance;
    with `--rerank N` the same again on the best of N candidates per image by CLIP."""
    from pipeline.progress import progress_bar
    from trainers.evaluate import EvalConfig, describe, evaluate
    from trainers.sample import load_generator

    config = EvalConfig(
        checkpoint=str(checkpoint),
        cache=cache,
        out=out,
        prompts=prompts,
        n=n,
        seed=seed,
        batch_size=batch_size,
        device=device,
        probe=probe,
        inception=inception,
        rerank=rerank,
    )
    config.validate()
    generate, info = load_generator(checkpoint, device=device, steps=steps, guidance=guidance)
    with progress_bar("eval", total=n * rerank) as advance:  # every candidate is one image generated
        result = evaluate(config, generate, info, progress=advance)
    typer.echo(f"{describe(result)} -> {out / 'eval.json'}")


@app.command("vae")
@user_errors
def vae_command(
    cache: Annotated[Path | None, typer.Option("--cache", help="Feature cache (its images).")] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Runs directory; the run goes to OUT/{idx:03d}-{name}/.")
    ] = Path("runs"),
    name: Annotated[str, typer.Option("--name", help="Run name.")] = "vae",
    size: Annotated[
        str, typer.Option("--size", help="trainers.vae.VAE_SIZES entry: tiny or small.")
    ] = "small",
    steps: Annotated[int, typer.Option("--steps", help="Optimisation steps.")] = 10_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 2e-4,
    seed: Annotated[int, typer.Option("--seed", help="Init, noise, data order, held-out choice.")] = 0,
    eval_n: Annotated[int, typer.Option("--eval-n", help="Held-out images for the PSNR in eval.json.")] = 64,
    disc_weight: Annotated[
        float,
        typer.Option("--disc-weight", help="Patch-discriminator (hinge) term weight; 0 trains without one."),
    ] = 0.0,
    disc_start: Annotated[
        int, typer.Option("--disc-start", help="Warm-up: the first step with the discriminator terms.")
    ] = 2000,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints (0: end only).")
    ] = 5000,
    allow_partial: AllowPartialOpt = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
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
) -> None:
    """Train the KL autoencoder (x4 down, 4 latent channels) that `trainers ldm` works in.

    With --encode CKPT: precompute that VAE's latents of every embed shard once (no training).
    """
    from trainers.distributed import training_bar
    from trainers.vae import VaeConfig, run_vae

    if encode is not None:
        from trainers.derived_shards import encode_command
        from trainers.latents import describe, encode_latents

        run = lambda advance: encode_latents(cache, encode, batch_size, device, advance)  # noqa: E731
        typer.echo(describe(encode_command("vae", cache, run)))
        return
    config = VaeConfig(
        cache=cache,
        out=out,
        name=name,
        size=size,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_n=eval_n,
        disc_weight=disc_weight,
        disc_start=disc_start,
        checkpoint_every=checkpoint_every,
        device=device,
        allow_partial=allow_partial,
    )
    config.validate()
    with training_bar("vae", steps) as advance:
        result = run_vae(config, advance)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return
    typer.echo(
        f"vae: step {result.step:,}, loss {result.losses['loss']:.4f}, held-out PSNR {result.psnr:.2f} dB "
        f"-> {result.checkpoint}"
    )


@app.command("ldm")
@user_errors
def ldm_command(
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Feature cache (images + conditions).")
    ] = None,
    vae: Annotated[
        Path | None, typer.Option("--vae", help="A `trainers vae` checkpoint or run directory.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Runs directory; the run goes to OUT/{idx:03d}-{name}/.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name. (default: ldm)")] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="trainers.ldm.LDM_SIZES entry: tiny, S or B. (default: S)")
    ] = None,
    condition: Annotated[
        str | None,
        typer.Option("--condition", help="optimize, retrieve, perturb or caption. (default: optimize)"),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Total steps. (default: 50000)")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Images per step. (default: 64)")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate. (default: 1e-4)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed. (default: 0)")] = None,
    init: InitOpt = None,
    paired_limit: PairedLimitOpt = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Checkpoint, or run directory (its latest), to continue.")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option("--checkpoint-every", help="Steps between checkpoints (0: end only).")
    ] = None,
    allow_partial: AllowPartialOpt = False,
    workers: Annotated[int | None, typer.Option("--workers", help="Loader processes. (default: 0)")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = None,
) -> None:
    """Train the DiT-style latent rectified-flow model on a frozen `trainers vae`, with guidance dropout."""
    from trainers.distributed import training_bar
    from trainers.train_ldm import resolve_config, run_ldm

    given = dict(
        cache=cache,
        vae=vae,
        out=out,
        name=name,
        size=size,
        condition=condition,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        init=init,
        paired_limit=paired_limit,
        checkpoint_every=checkpoint_every,
        workers=workers,
        device=device,
        allow_partial=allow_partial or None,  # not given: a resumed run keeps its own
    )
    config, checkpoint = resolve_config({k: v for k, v in given.items() if v is not None}, resume)
    config.validate()
    with training_bar("ldm", config.steps) as advance:
        result = run_ldm(config, resume_state=checkpoint, progress=advance)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if not result.losses:
        typer.echo(f"ldm: already at step {result.step:,} of {config.steps:,} -> {result.run_dir}")
        return
    typer.echo(
        f"ldm: step {result.step:,}, loss {result.losses['loss']:.4f}, {result.data['n_images']:,} images "
        f"({result.data['pairs']:,} pairs) -> {result.checkpoint}"
    )


app.command("clip")(clip_command)
app.command("probe")(probe_command)
app.command("compare")(compare_command)
app.command("dvae")(dvae_command)
app.command("dalle")(dalle_command)


def main() -> None:
    app()
