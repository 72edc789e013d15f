"""`trainers clip` and `trainers probe`, the commands of the offline instruments (their cores:
trainers/clip/train.py, trainers/probe/probe.py); registered on the `trainers` app in cli/trainers.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DEVICE_HELP, given_options, user_errors
from cli.options import STEP_COST, shown


@user_errors
def clip_command(
    shards: Annotated[
        list[str] | None,
        typer.Argument(
            help="More image-caption inputs (so `--data world/*.tar` works unquoted).", show_default=False
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="Image-caption inputs: WebDataset tars (the synthetic world: `pipeline synth`), folders "
            "with .txt captions, Parquet; globs. Repeatable.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Run directory for clip.pt, clip_config.json, clip_eval.json.",
            show_default="runs/NNN-clip-SIZE",
        ),
    ] = None,
    size: Annotated[
        str | None,
        shown(
            "--size",
            "rn32 (lafite-rn32: ModifiedResNet, 32 px; sees shape, colour, size and position), tiny "
            "(lafite-tiny ViT, 32 px) or small (lafite-small ViT, 64 px)."
            + STEP_COST
            + "rn32 0.09, tiny 0.05, "
            "small 1.7.",
        ),
    ] = None,
    steps: Annotated[int | None, shown("--steps", "Optimisation steps.")] = None,
    batch_size: Annotated[
        int | None,
        shown("--batch-size", "Pairs per step (the InfoNCE negatives), in whole contrast groups."),
    ] = None,
    pretrain_n: Annotated[
        int | None,
        shown(
            "--pretrain-n",
            "Without --data: how many fresh synthetic pairs to render for training (indices from "
            "2*10^9, disjoint from every `pipeline synth` world and from the held-out eval images).",
        ),
    ] = None,
    contrast_group: Annotated[
        int | None,
        shown(
            "--contrast-group",
            "Without --data: scenes per group that differ only in the first object's shape, so each "
            "batch forces the loss to learn shape (1: independent pairs).",
        ),
    ] = None,
    max_objects: Annotated[
        int | None,
        shown(
            "--max-objects",
            "Without --data: objects per training image, 1 or 2 (2 binds attributes to objects in "
            "two-object scenes but reads single objects less well in the same time; BENCHMARKS.md).",
        ),
    ] = None,
    caption_style: Annotated[
        str | None,
        shown(
            "--caption-style",
            "Without --data: partial (each step's captions name a fresh random 1-4 of an object's "
            "attributes: images say more than their captions, which gives the CLIP a modality gap like a "
            "real one's) or full (every attribute, the former recipe: almost no gap).",
        ),
    ] = None,
    temperature: Annotated[
        str | None,
        shown(
            "--temperature",
            "Fixed InfoNCE temperature, 0.01-10, or `learnt` (open_clip's: from 0.07, as the logit scale). "
            "A low fixed one keeps the modality gap; a learnt one closes it (Liang et al. 2022).",
        ),
    ] = None,
    temperature_start: Annotated[
        float | None,
        shown(
            "--temperature-start",
            "With a fixed --temperature: start at this one and anneal to it, geometrically, over the first "
            "half of the steps (a warmer start learns the harder attributes sooner; the gap stays). Equal to "
            "--temperature: fixed from the first step.",
        ),
    ] = None,
    lr: Annotated[float | None, shown("--lr", "AdamW peak learning rate (warmup, then cosine).")] = None,
    seed: Annotated[int | None, shown("--seed", "Init, batch order and augmentation.")] = None,
    eval_n: Annotated[
        int | None, shown("--eval-n", "Held-out synthetic images for zero-shot accuracy (0: skip).")
    ] = None,
    device: Annotated[str | None, shown("--device", DEVICE_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUT/clip.pt.")] = False,
    checkpoint_every: Annotated[
        int | None,
        shown(
            "--checkpoint-every",
            "Steps between saves of OUT/train_state.pt, the run so far (0: none); removed at the end.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from OUT/train_state.pt (a run stopped before its end), to the same weights as a "
            "run never stopped; its learnt options must be the same.",
        ),
    ] = False,
) -> None:
    """Train a small CLIP (open_clip, bundled config) for offline caches: on a fresh synthetic stream by
    default (a real CLIP is pretrained on other pairs than the generator's), or on given image-caption shards.

    Then: `pipeline embed ... --clip-model OUT/clip_config.json --clip-pretrained OUT/clip.pt`.
    """
    given = given_options(locals(), "shards", "data")
    from core.errors import ConfigError
    from trainers.clip.config import CLIP_SIZES, ClipTrainConfig, parse_temperature
    from trainers.clip.train import describe, train_clip
    from trainers.runtime.distributed import training_bar

    if "temperature" in given:
        given["temperature"] = parse_temperature(given["temperature"])
        if given["temperature"] is None:  # learnt: no default warm start to anneal from
            given.setdefault("temperature_start", None)
    config = ClipTrainConfig(**given, data=tuple(data or ()) + tuple(shards or ()))
    if config.size not in CLIP_SIZES:
        raise ConfigError(f"--size {config.size}: choose one of {', '.join(CLIP_SIZES)}")
    with training_bar("clip", config.steps) as advance:
        result = train_clip(config, advance)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return
    typer.echo(describe(result))


@user_errors
def probe_command(
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Feature cache: the probe is trained at its image size.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Probe file to write (+ .json beside it).", show_default="kept in CACHE/_trainers/"
        ),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Image size, instead of --cache.", show_default=False)
    ] = None,
    n_train: Annotated[int | None, shown("--n-train", "Rendered training images.")] = None,
    epochs: Annotated[int | None, shown("--epochs", "Passes over them.")] = None,
    seed: Annotated[int | None, shown("--seed", "Training images, init and order.")] = None,
    device: Annotated[str | None, shown("--device", DEVICE_HELP)] = None,
) -> None:
    """Train the synthetic world's attribute classifier (the instrument `trainers eval` measures with)."""
    given = given_options(locals(), "cache", "out", "image_size")
    from core.errors import ConfigError
    from core.progress import progress_bar
    from trainers.probe.config import ProbeConfig
    from trainers.probe.probe import cached_probe, describe, save_probe, train_probe

    if (cache is None) == (image_size is None):
        raise ConfigError("give --cache (its image size is used) or --image-size, not both")
    if cache is not None:
        from feature_cache.embed_rows import cache_image_size

        size = cache_image_size(cache)
    else:
        size = image_size
    config = ProbeConfig(**given, image_size=size)
    config.validate()
    if out is not None and (out.is_dir() or out.suffix == ""):
        raise ConfigError(f"--out {out}: give a file path such as probe.pt")
    with progress_bar("probe", total=None, unit="step") as advance:
        if out is None:
            probe, path = cached_probe(cache, config, advance)
        else:
            probe = train_probe(config, advance)
            path = save_probe(probe, out)
            from manifests import write_json_atomic

            write_json_atomic(
                out.with_suffix(".json"), {"config": probe.state()["config"], "accuracy": probe.accuracy}
            )
    typer.echo(f"{describe(probe)} -> {path or 'memory (cache not writable)'}")
