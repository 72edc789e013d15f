"""The `pipeline` command: one Typer app, one thin command per stage.

Commands only turn options into a stage config and print results; the work lives in the stage
modules, imported inside each command so `pipeline --help` stays instant.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import ConfigError
from pipeline.progress import describe_drops, progress_bar, stderr

app = typer.Typer(
    help="Language-free text-to-image features: synth -> embed -> retrieve -> optimize, into one cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Project config (default: ./pipeline.toml if present). Flags override it."
        ),
    ] = None,
) -> None:
    """Language-free text-to-image features: synth -> embed -> retrieve -> optimize, into one cache."""
    from pipeline.config import default_map, read_config

    try:
        raw = read_config(config)
        if raw:
            ctx.default_map = default_map(raw, _commands(), str(config or "pipeline.toml"))
    except ConfigError as e:
        _fail(e)


def _fail(error: Exception):
    """One line on stderr, exit code 2. The message is printed verbatim ('[embed]' is no markup)."""
    from rich.markup import escape

    stderr.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


def _commands() -> dict[str, Callable]:
    """Command name -> its function, for checking pipeline.toml against the real options."""
    return {info.name or info.callback.__name__: info.callback for info in app.registered_commands}


CacheOpt = Annotated[Path, typer.Option("--cache", help="Feature cache directory.")]
ClipModelOpt = Annotated[
    str,
    typer.Option(
        "--clip-model",
        help="open_clip architecture (ViT-B-32), bundled config (lafite-tiny, lafite-small) or a "
        "model-config JSON file.",
    ),
]
ClipPretrainedOpt = Annotated[
    str,
    typer.Option(
        "--clip-pretrained",
        help="open_clip pretrained tag (openai, laion2b_s34b_b79k) or a local checkpoint file; '' for "
        "random weights. Offline? Download the checkpoint elsewhere and pass its path.",
    ),
]


def _one_line_warnings() -> None:
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def user_errors(command: Callable) -> Callable:
    """A ConfigError becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _one_line_warnings()
        try:
            return command(*args, **kwargs)
        except ConfigError as e:
            _fail(e)

    return wrapper


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output directory for shards and the caption corpus.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same bytes.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels.")] = 64,
    max_objects: Annotated[int, typer.Option("--max-objects", help="Objects per image: 1 or 2.")] = 2,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per tar shard.")] = 500,
    n_captions: Annotated[
        int, typer.Option("--n-captions", help="Size of the independent caption corpus.")
    ] = 20000,
) -> None:
    """Render the synthetic world: WebDataset shards of labelled images, and an independent caption corpus."""
    from pipeline.synth import SynthConfig, run_synth

    config = SynthConfig(
        out=out,
        n=n,
        seed=seed,
        image_size=image_size,
        max_objects=max_objects,
        shard_size=shard_size,
        n_captions=n_captions,
    )
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
    cache: CacheOpt = Path("cache"),
    clip_model: ClipModelOpt = "ViT-B-32",
    clip_pretrained: ClipPretrainedOpt = "openai",
    image_size: Annotated[
        int, typer.Option("--image-size", help="Stored training size (centre crop + resize); 0 keeps it.")
    ] = 256,
    image_format: Annotated[str, typer.Option("--image-format", help="jpg, png or webp.")] = "jpg",
    quality: Annotated[int, typer.Option("--quality", help="JPEG/WebP quality of re-encoded images.")] = 95,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", help="Skip larger images (decompression bombs).")
    ] = 64_000_000,
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Images per shard for folder inputs.")
    ] = 10_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per CLIP forward pass.")] = 256,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Decoding processes (default: min(8, cores)).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    verify: Annotated[
        bool, typer.Option("--verify", help="Hash file contents instead of trusting size and mtime.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Remake every shard.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved plan and exit.")] = False,
) -> None:
    """Embed images with CLIP into the cache: embed/{i}.tar (image, img_emb.npy, json) + .parquet sidecar.

    Reruns do only what changed: new images go into new shards, a changed image remakes its shard, a
    changed model or image size remakes everything.
    """
    from pipeline.embed import EmbedConfig, describe_plan, plan_embed, run_embed

    kwargs = {} if workers is None else {"workers": workers}
    config = EmbedConfig(
        inputs=tuple(inputs or ()),
        cache=cache,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        image_size=image_size,
        image_format=image_format,
        quality=quality,
        max_pixels=max_pixels,
        shard_size=shard_size,
        batch_size=batch_size,
        device=device,
        verify=verify,
        force=force,
        **kwargs,
    )
    if dry_run:
        typer.echo(json.dumps(describe_plan(config, plan_embed(config, write_plan=False)), indent=1))
        return
    with progress_bar("embed", total=None) as advance:
        result = run_embed(config, advance)
    typer.echo(
        f"embed: {len(result.shards_run)} shard(s) made, {len(result.shards_up_to_date)} up to date; "
        f"{result.images_written:,} images written, {describe_drops(result.dropped)}; "
        f"{result.seconds:.1f} s -> {cache / 'embed'}"
    )


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the world, the cache and the results go.")] = Path(
        "demo"
    ),
    preset: Annotated[
        str, typer.Option("--preset", help="cpu (minutes on 2 cores) or gpu (larger).")
    ] = "cpu",
    workers: Annotated[int, typer.Option("--workers", help="Decoding processes.")] = 2,
) -> None:
    """Run the whole story offline on the synthetic world and print where the outputs are."""
    from pipeline.demo import run_demo

    with progress_bar("demo", total=None) as advance:
        result = run_demo(out, preset, workers, advance)
    typer.echo(f"demo: world {result.world}, cache {result.cache} ({result.images:,} images embedded)")


@app.command()
@user_errors
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path("pipeline.toml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented pipeline.toml holding every stage option at its default."""
    from manifests import write_bytes_atomic
    from pipeline.config import render_default_config

    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    write_bytes_atomic(path, render_default_config(_commands()).encode())
    typer.echo(f"wrote {path}: edit it, then `pipeline run`")


def main() -> None:
    app()
