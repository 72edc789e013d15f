"""What the `trainers` commands share: options written once, defaults read from each command's config
dataclass, and the body of the resumable trainers' commands (gan, ldm, dvae, dalle).

A trainer's option defaults to None, "not given": its config decides, or on --resume the checkpoint. Its
help still says the config's default, as typer says every other: `shown` options show `[default: X]`, and
an option whose default is decided elsewhere says so the same way (`show_default="the preset's"`). The
command class `defaults_from(config)` reads X from the dataclass when
--help is printed, not at import: the trainers' configs live beside torch or numpy, which must load after
the root callback has set the threads (core.processes.start_threads), and torch's import (1.3 s on 2
cores) would slow `trainers --help` and every other trainer's command. The command passes the options
given (cli.common.given_options) to the config, which supplies the rest.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand
from typer.models import OptionInfo

from cli.common import DEVICE_HELP
from core.errors import ConfigError, require_at_least

SHOWN = "the config's"  # a `shown` option's show_default until --help puts the value in


def shown(flag: str, help: str, **kwargs: Any) -> OptionInfo:
    """An option that defaults to None and shows its config field's default as typer does: `[default: X]`."""
    return typer.Option(flag, help=help, show_default=SHOWN, **kwargs)


def config_defaults(config: str) -> dict[str, Any]:
    """Field -> default of the dataclass `config` ("module:Class"), for the fields with a fixed one."""
    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def say_defaults(params: Iterable[Any], defaults: dict[str, Any]) -> None:
    """Put each `shown` option's default, `defaults[option name]`, into its help."""
    for param in params:
        if getattr(param, "show_default", None) == SHOWN:
            param.default, param.show_default = defaults[param.name], True


def defaults_from(config: str) -> type[TyperCommand]:
    """The command class (`app.command(cls=...)`) of a trainer whose options are `shown`: its
    --help takes their defaults from the dataclass `config` ("module:Class")."""

    class SaysConfigDefaults(TyperCommand):
        def format_help(self, ctx, formatter) -> None:
            say_defaults(self.params, config_defaults(config))
            super().format_help(ctx, formatter)

    return SaysConfigDefaults


RUNS_HELP = "Runs directory; the run goes to OUT/{idx:03d}-{name}/."
# Each --size help ends with what a step of each size costs (benchmarks/bench_sizes.py, BENCHMARKS.md)
STEP_COST = (
    " Seconds per step on 2 quiet CPU cores at the default batch, measured (README, what a step costs): "
)
CHECKPOINTS_HELP = "Steps between checkpoints (0: end only)."
NAME_HELP = "Run name."
BATCH_HELP = "Images per step."

# Options of several trainers; each says its own config's default.
RunsOpt = Annotated[Path | None, shown("--out", RUNS_HELP)]
NameOpt = Annotated[str | None, shown("--name", NAME_HELP)]
ConditionOpt = Annotated[
    str | None,
    shown(
        "--condition",
        "optimize, retrieve, perturb or caption; optimize:NAME for a pipeline.toml variant "
        "([optimize.variants.NAME]).",
    ),
]
TotalStepsOpt = Annotated[int | None, shown("--steps", "Total steps (a resume continues to it).")]
BatchOpt = Annotated[int | None, shown("--batch-size", BATCH_HELP)]
PairedFractionOpt = Annotated[
    float | None, shown("--paired-fraction", "Share of samples given real-caption features.")
]
SampleEveryOpt = Annotated[int | None, shown("--sample-every", "Steps between sample grids (0: end only).")]
CheckpointEveryOpt = Annotated[int | None, shown("--checkpoint-every", CHECKPOINTS_HELP)]
LogEveryOpt = Annotated[int | None, shown("--log-every", "Steps between metrics.jsonl lines.")]
CompileOpt = Annotated[
    str | None,
    typer.Option(
        "--compile",
        help="torch.compile the training forward with this backend: inductor (the compiler; the first "
        "steps compile), aot_eager (tracing only, to check a model compiles).",
        show_default="off",
        metavar="BACKEND",
    ),
]
WorkersOpt = Annotated[int | None, shown("--workers", "Loader processes.")]
RunDeviceOpt = Annotated[str | None, shown("--device", DEVICE_HELP)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")]
AllowPartialOpt = Annotated[
    bool,
    typer.Option(
        "--allow-partial",
        help="Train on the usable shards when some are being rewritten, stale or not made yet (without "
        "it: wait briefly, then refuse); config.json records the rows used.",
    ),
]
AcceptLossyOpt = Annotated[
    bool,
    typer.Option(
        "--accept-lossy",
        help="With --encode: encode even when the reconstructions lose the objects (the probe reads under "
        "half the real images' colour or position on the synthetic world; see "
        "trainers/autoencoders/recon_probe.py).",
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
GridPromptsOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="Sample-grid prompts, one per line (rows of the grids the run writes).",
        show_default="synthetic-world captions",
    ),
]


def with_grid_prompts(given: dict[str, Any], prompts: Path | None) -> dict[str, Any]:
    """The options given, with --prompts FILE read into the config's tuple of sample-grid prompts (an
    unreadable or empty file is one line)."""
    if prompts is None:
        return given
    from trainers.probe.prompts import read_prompts

    return {**given, "prompts": tuple(read_prompts(prompts))}


ProbeOpt = Annotated[
    Path | None,
    typer.Option("--probe", help="A `trainers probe` file.", show_default="trained once per cache"),
]


def train(
    name: str,
    resolve: Callable,
    run: Callable,
    given: dict[str, Any],
    resume: Path | None,
    *,
    dry_run: bool = False,
    bar: bool = True,
    already: str = "",
) -> Any:
    """The body of a resumable trainer's command: the options given -> its config (`resolve`: the
    checkpoint's on --resume), printed by --dry-run, else `run` under the command's progress bar (`bar`
    False: the run shows its own). -> the result to report, or None when there is nothing to: a dry run,
    a torchrun rank other than 0, or a run already at --steps (said here, then `already`)."""
    import json

    from trainers.runtime.distributed import training_bar

    config, checkpoint = resolve(given, resume)
    config.validate()
    if dry_run:
        typer.echo(json.dumps(config.to_dict(), indent=1))
        return None
    if bar:
        with training_bar(name, config.steps) as advance:
            result = run(config, resume_state=checkpoint, progress=advance)
    else:
        result = run(config, resume_state=checkpoint)
    if result.run_dir is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    if not result.losses:
        step = f"{result.step:,} of {config.steps:,}"
        typer.echo(f"{name}: already at step {step}{already} -> {result.run_dir}")
        return None
    return result


def encode_command(
    command: str,
    cache: Path | None,
    encode: Callable[[Any], Any],
    checkpoint: Path,
    batch_size: int,
    device: str,
    accept_lossy: bool = False,
) -> Any:
    """`trainers {command} --encode CHECKPOINT`: one process (never under torchrun), holding the cache's
    lock (the derived folder is a stage of the cache, written like the pipeline's), refusing an
    autoencoder that loses the objects unless `accept_lossy`
    (cli.options.check_encoder), with
    a progress bar; -> what `encode(advance)` returns."""
    from core.progress import progress_bar
    from feature_cache.lock import writing
    from trainers.runtime.distributed import launched_world

    if cache is None:
        raise ConfigError("--cache is required: the feature cache whose images --encode encodes")
    if launched_world().distributed:
        raise ConfigError(f"--encode runs as one process: run `trainers {command} --encode` without torchrun")
    require_at_least(("--batch-size", batch_size, 1))
    with writing(cache):
        if not accept_lossy:
            pass

            check_encoder(cache, checkpoint, command, device)
        with progress_bar(f"{command} --encode", total=None, unit="img") as advance:
            return encode(advance)


def check_encoder(cache: Path, checkpoint: Path, kind: str, device: str = "auto") -> dict[str, Any] | None:
    """`check_keeps_objects` for a `trainers vae` (kind "vae") or `trainers dvae` checkpoint."""
    from trainers.autoencoders.recon_probe import check_keeps_objects
    from trainers.runtime.runs import select_device

    dev = select_device(device)
    if kind == "vae":
        from trainers.autoencoders.vae.model import load_vae, reconstruct

        vae = load_vae(checkpoint, "--encode")[0].to(dev)
        return check_keeps_objects(cache, lambda x: reconstruct(vae, x), f"--encode {checkpoint}", str(dev))
    from trainers.autoencoders.dvae.model import load_dvae
    from trainers.autoencoders.dvae.model import reconstruct as from_codes

    dvae = load_dvae(checkpoint, "--encode")[0].to(dev)
    return check_keeps_objects(cache, lambda x: from_codes(dvae, x)[0], f"--encode {checkpoint}", str(dev))
