"""The `pipeline` command: one Typer app, one thin command per stage.

Commands only turn options into a stage config and print results; the work lives in the stage
modules, imported inside each command so `pipeline --help` stays instant. `retrieve` and `optimize` have
their commands in cli/pipeline_stages.py; the options and error handling every command shares (this
app's and `trainers`') are in cli/common.py.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cli import pipeline_stages as cli_stages
from cli.common import (
    CacheOpt,
    ClipModelOpt,
    ClipPretrainedOpt,
    DeviceOpt,
    DryRunPlanOpt,
    ForceOpt,
    RepairOpt,
    ThreadsOpt,
    WaitOpt,
    fail,
    given_options,
    user_errors,
)
from cli.help import ordered_group
from core.errors import ConfigError
from core.progress import progress_bar, stderr
from feature_cache.lock import writing
from pipeline.embed.config import EmbedConfig
from pipeline.run import RunConfig
from world.synth import SynthConfig

# As run; doctor checks the machine, demo runs it all on a synthetic world.
COMMAND_ORDER = ("init", "synth", "embed", "retrieve", "optimize", "run", "status", "doctor", "demo")

app = typer.Typer(
    cls=ordered_group(COMMAND_ORDER),
    help="Language-free text-to-image features: synth -> embed -> retrieve -> optimize, into one cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs re-flow instead of keeping source line breaks
)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Project config. Flags override it.",
            show_default="./pipeline.toml if present",
        ),
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Language-free text-to-image features: synth -> embed -> retrieve -> optimize, into one cache."""
    from core.processes import start_threads
    from pipeline.engine.config import STORAGE_OPTIONS, default_map, read_config
    from storage import remote

    start_threads(threads)
    try:
        raw = read_config(config)
        if raw:
            ctx.default_map = default_map(raw, _commands(), str(config or "pipeline.toml"))
            remote.configure(raw.get(STORAGE_OPTIONS, {}))
    except ConfigError as e:
        fail(e)


def _commands() -> dict[str, Callable]:
    """Command name -> its function, for checking pipeline.toml against the real options."""
    return {info.name or info.callback.__name__: info.callback for info in app.registered_commands}


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output directory for shards and the caption corpus.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = SynthConfig.n,
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed: same seed, same bytes.")
    ] = SynthConfig.seed,
    image_size: Annotated[
        int, typer.Option("--image-size", help="Image side in pixels.")
    ] = SynthConfig.image_size,
    max_objects: Annotated[
        int, typer.Option("--max-objects", help="Objects per image: 1 or 2.")
    ] = SynthConfig.max_objects,
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Images per tar shard.")
    ] = SynthConfig.shard_size,
    n_captions: Annotated[
        int, typer.Option("--n-captions", help="Size of the independent caption corpus.")
    ] = SynthConfig.n_captions,
    caption_style: Annotated[
        str,
        typer.Option(
            "--caption-style",
            help="partial: each caption names a random 1-4 of an object's attributes, several per image (a "
            "CLIP trained on such pairs has a real modality gap); full: the former world, one caption "
            "naming every attribute (reproduces older numbers).",
        ),
    ] = SynthConfig.caption_style,
    captions_per_image: Annotated[
        int | None,
        typer.Option("--captions-per-image", help="Captions per image [default: 5 partial, 1 full]."),
    ] = SynthConfig.captions_per_image,
) -> None:
    """Render the synthetic world: WebDataset shards of labelled images, and an independent caption corpus."""
    config = SynthConfig(**given_options(locals()))
    from world.synth import run_synth

    with progress_bar("synth", total=n) as advance:
        done = 0

        def on_progress(n_done: int) -> None:
            nonlocal done
            advance(n_done - done)
            done = n_done

        result = run_synth(config, progress=on_progress)
    typer.echo(f"synth: {n:,} images in {len(result.shards)} shards, {result.n_captions:,} captions -> {out}")


@app.command()
@user_errors
def embed(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image folders (recursive), image files, WebDataset .tar shards or .parquet files with an "
            "image-bytes column. Globs and {000..009} brace patterns are expanded.",
            show_default=False,
        ),
    ] = None,
    cache: CacheOpt = EmbedConfig.cache,
    clip_model: ClipModelOpt = EmbedConfig.clip_model,
    clip_pretrained: ClipPretrainedOpt = EmbedConfig.clip_pretrained,
    image_size: Annotated[
        int, typer.Option("--image-size", help="Stored training size (centre crop + resize); 0 keeps it.")
    ] = EmbedConfig.image_size,
    image_format: Annotated[
        str, typer.Option("--image-format", help="jpg, png or webp.")
    ] = EmbedConfig.image_format,
    quality: Annotated[
        int, typer.Option("--quality", help="JPEG/WebP quality of re-encoded images.")
    ] = EmbedConfig.quality,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", help="Skip larger images (decompression bombs).")
    ] = EmbedConfig.max_pixels,
    max_aspect: Annotated[
        float,
        typer.Option(
            "--max-aspect",
            help="Skip images whose long side / short side is larger: the square centre crop of a 10:1 "
            "image keeps a tenth of it, of a 1x60000 strip one pixel.",
        ),
    ] = EmbedConfig.max_aspect,
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Images per shard for folder inputs.")
    ] = EmbedConfig.shard_size,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per CLIP forward pass.")
    ] = EmbedConfig.batch_size,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Decoding processes; threads inside a Dask worker, whose processes may not have children.",
            show_default="min(8, cores)",
        ),
    ] = None,
    device: DeviceOpt = EmbedConfig.device,
    verify: Annotated[
        bool, typer.Option("--verify", help="Hash file contents instead of trusting size and mtime.")
    ] = EmbedConfig.verify,
    force: ForceOpt = EmbedConfig.force,
    key_prefix: Annotated[
        str,
        typer.Option(
            "--key-prefix",
            help="Keys must be unique in a cache: none (as the source gives them; two inputs holding one "
            "key are refused before anything is written), input (each key prefixed with its input "
            "folder's name: dl1/000000012) or a TEMPLATE using {input}, {parent}, {stem}.",
        ),
    ] = EmbedConfig.key_prefix,
    repair: RepairOpt = EmbedConfig.repair,
    wait: WaitOpt = 0.0,
    dry_run: DryRunPlanOpt = False,
) -> None:
    """Embed images with CLIP into the cache: embed/{i}.tar (image, img_emb.npy, json) + .parquet sidecar.

    Reruns do only what changed: new images go into new shards, a changed image remakes its shard, a
    changed model or image size remakes everything.
    """
    given = given_options(locals(), "inputs", "wait", "dry_run")  # without --workers: EmbedConfig's
    from pipeline.embed.stage import check_first_run, describe_plan, plan_embed, report, run_embed

    config = EmbedConfig(inputs=tuple(inputs or ()), **given)
    if dry_run:
        typer.echo(json.dumps(describe_plan(config, plan_embed(config, write_plan=False)), indent=1))
        return
    check_first_run(config)  # before the lock: a first run that cannot load CLIP leaves no cache behind
    with writing(cache, wait, create=True), progress_bar("embed", total=None) as advance:
        result = run_embed(config, advance)
    for line in report(result, config):  # what `pipeline run` prints too
        typer.echo(line)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the world, the cache and the runs go.")] = Path(
        "demo"
    ),
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="cpu (22 min on 2 cores of a slow machine, measured; longer on a busy one), gpu (a larger "
            "world, longer training) or smoke (about a minute: checks the wiring).",
        ),
    ] = ("cpu"),
    generator: Annotated[
        str,
        typer.Option(
            "--generator",
            help="The family compared: gan (the default), ldm (diffusion, the compare preset's space) or "
            "dalle (dVAE tokens + transformer). A rerun with another family reuses the world, CLIP and "
            "cache; each family's runs go to OUT/compare[-FAMILY].",
        ),
    ] = "gan",
    world: Annotated[
        str,
        typer.Option(
            "--world",
            help="partial (captions name some of what an image shows, so the CLIP has a real modality "
            "gap) or full (the former world: every caption names every attribute, almost no gap; "
            "reproduces older numbers).",
        ),
    ] = "partial",
    workers: Annotated[int, typer.Option("--workers", help="Decoding processes.")] = 2,
    device: DeviceOpt = "auto",
) -> None:
    """The whole story offline on the synthetic world: synth, train a small CLIP on fresh synthetic pairs,
    pipeline run, then `trainers compare` of generators (GANs unless --generator) trained on perturb vs
    optimize features; prints the table and where the outputs are."""
    from cli.demo import run_demo
    from trainers.clip.train import describe_gap, read_eval
    from trainers.compare.run import describe

    result = run_demo(out, preset, workers, device, generator, world)
    clip_eval = read_eval(result.clip_eval.parent)
    zero_shot = clip_eval.get("zero_shot") or {}
    files = result.compare.files
    typer.echo(f"world:    {result.world}")
    typer.echo(f"cache:    {result.cache}")
    typer.echo(f"config:   {result.config}   (pipeline --config {result.config} status, or run)")
    typer.echo(
        f"clip:     {result.clip_eval}   (zero-shot "
        + ", ".join(f"{k} {v:.2f}" for k, v in zero_shot.items())
        + describe_gap(clip_eval.get("modality_gap"))
        + ")"
    )
    for name in ("report", "samples", "accuracy_bars", "results_csv"):
        if name in files:
            typer.echo(f"{name + ':':<9} {files[name]}")
    typer.echo(describe(result.compare))


@app.command()
@user_errors
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path("pipeline.toml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented pipeline.toml holding every stage option at its default."""
    from manifests import write_bytes_atomic
    from pipeline.engine.config import render_default_config

    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    write_bytes_atomic(path, render_default_config(_commands()).encode())
    typer.echo(f"wrote {path}: edit it, then `pipeline run`")


app.command()(cli_stages.retrieve)  # registered here: pipeline.toml's sections follow this order
app.command()(cli_stages.optimize)


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _sections(ctx: typer.Context) -> dict[str, dict]:
    return dict(ctx.find_root().default_map or {})


@app.command()
@user_errors
def run(
    ctx: typer.Context,
    cache: CacheOpt = RunConfig.cache,
    until: Annotated[
        str, typer.Option("--until", help="Last stage to run: embed, retrieve or optimize.")
    ] = RunConfig.until,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Remake every shard of this stage (repeatable).")
    ] = None,
    executor: Annotated[
        str, typer.Option("--executor", help="local, or dask (a Dask cluster).")
    ] = RunConfig.executor,
    scheduler: Annotated[
        str | None,
        typer.Option("--scheduler", help="Dask scheduler address.", show_default="$DASK_SCHEDULER_ADDRESS"),
    ] = RunConfig.scheduler,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Start a LocalCluster of N workers when no scheduler.")
    ] = RunConfig.workers,
    wait: WaitOpt = RunConfig.wait,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Re-hash every input and output instead of trusting size and mtime, and remake what is "
            "damaged (bit rot, a bad copy).",
        ),
    ] = RunConfig.verify,
    repair: RepairOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would run and why, and exit.")
    ] = False,
) -> None:
    """Run embed, retrieve and optimize from pipeline.toml, each only on its stale shards.

    Edit pipeline.toml (`pipeline init` writes one), then `pipeline run`: it does exactly the work the
    change requires. Two runs on one cache never write at once: the second waits (--wait) or stops.
    """
    from manifests import verifying_outputs
    from pipeline.run import report_lines, run_pipeline, stage_configs
    from pipeline.status import pipeline_status, render_status

    sections = _sections(ctx)
    if not sections:
        raise ConfigError("no pipeline.toml found: write one with `pipeline init` (or pass --config FILE)")
    run_config = RunConfig(cache, until, tuple(force or ()), executor, scheduler, workers, wait, verify)
    run_config.validate()
    configs = stage_configs(sections, cache, run_config.force, verify=verify, repair=repair)
    if dry_run:
        with verifying_outputs(verify):
            stages = pipeline_status(cache, configs)
        typer.echo(render_status(stages))
        return
    results = run_pipeline(configs, run_config, progress_bar)
    for warning in (w for result in results.values() for w in result.warnings):
        warnings.warn(warning, stacklevel=1)  # as the stage's own command warns (a recall target missed)
    for line in report_lines(configs, results):
        typer.echo(line)


@app.command()
@user_errors
def status(
    ctx: typer.Context,
    cache: CacheOpt = RunConfig.cache,
    as_json: JsonOpt = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also re-hash every input and output against its recorded digest (reads all the data; "
            "see BENCHMARKS.md for the cost per GB). `pipeline run --verify` then remakes what is damaged.",
        ),
    ] = False,
) -> None:
    """Per stage: shards up to date, and the stale ones with the reason.

    Reads manifests and file stats only (sizes, mtimes), so it is instant and cannot see bytes that
    changed in place: `--verify` checks content digests too. New and changed images are judged against
    pipeline.toml's [embed] inputs, else against those the cache's last embed run recorded.
    """
    from manifests import verifying_outputs
    from pipeline.run import stage_configs
    from pipeline.status import pipeline_status, render_status

    sections = _sections(ctx)
    configs = (
        stage_configs(sections, cache, verify=verify) if sections.get("embed", {}).get("inputs") else None
    )
    # pipeline.toml's cache, as `pipeline run` takes it: another --cache must hold a cache to be compared
    configured = Path(sections.get("run", {}).get("cache", RunConfig.cache)) if sections else None
    with verifying_outputs(verify):
        stages = pipeline_status(cache, configs, configured_cache=configured)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in stages], indent=1))
    else:
        typer.echo(render_status(stages))


@app.command()
@user_errors
def doctor(
    ctx: typer.Context,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Also summarise `pipeline status` of this cache.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """What to trust a machine by before a long run: versions, devices and free memory, the kernel
    self-check, faiss-gpu, thread and worker defaults, the CLIP weights, and what pipeline.toml needs.

    In seconds, offline too: only CLIP weights missing from the local cache make it probe the hub, once
    (no probe under HF_HUB_OFFLINE). Exits 1 when something the config needs is missing; warnings do not fail.
    """
    from cli.doctor import diagnose, render_report

    report = diagnose(cache, _sections(ctx))
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else render_report(report))
    if report.missing:
        stderr.print(
            f"doctor: missing {', '.join(c.name for c in report.missing)}", highlight=False, markup=False
        )
        raise typer.Exit(1)


def main() -> None:
    app()
