"""What the `pipeline` and `trainers` commands share: options, the cache lock a writing command holds,
and user errors as one line on stderr with exit code 2."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from core.errors import ConfigError
from core.progress import stderr

ThreadsOpt = Annotated[  # a root option of both apps (core.processes.start_threads)
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="Torch threads of the command's process, shared with the worker processes it starts. On a "
        "machine shared with other jobs, use 1.",
        show_default="OMP_NUM_THREADS, else the CPUs it may use less those the load average says are busy",
    ),
]


def fail(error: Exception):
    """One line on stderr, exit code 2. The message is printed verbatim ('[embed]' is no markup)."""
    from rich.markup import escape

    stderr.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


DEVICE_HELP = "auto, cpu, cuda or cuda:N."
CacheOpt = Annotated[Path, typer.Option("--cache", help="Feature cache directory.")]
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Remake every shard.")]
DryRunPlanOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved plan and exit.")]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait",
        help="Seconds to wait for another command that is writing this cache (0: stop at once).",
    ),
]
RepairOpt = Annotated[
    bool,
    typer.Option(
        "--repair", help="Rebuild a damaged embed shard plan (embed/_plan.json) from the manifests."
    ),
]
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
        help="auto (the model's openai weights where open_clip has them, else random weights with a "
        "warning), an open_clip pretrained tag (openai, laion2b_s34b_b79k) or a local checkpoint file; '' "
        "for random weights. Offline? Download the checkpoint elsewhere and pass its path.",
    ),
]


def given_options(options: dict[str, Any], *besides: str) -> dict[str, Any]:
    """The options given, for the command's config to take: from the command's `locals()` taken first
    thing (its parameters), those not None and the flags set (every flag defaults to off), less `besides`
    (the ones that are no config field). The config's defaults supply the rest."""
    return {k: v for k, v in options.items() if k not in besides and v is not None and v is not False}


def one_line_warnings() -> None:
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def user_errors(command: Callable) -> Callable:
    """A ConfigError or CacheFault (disk full, a damaged file, a read-only cache) becomes one line on
    stderr and exit code 2, never a traceback. An ENOSPC, EROFS or EACCES that escaped the writers' own
    checks (a third-party writer, a folder of outputs) reads the same."""
    from manifests.errors import DISK_FULL_ERRNOS, CacheFault
    from manifests.lock import NOT_WRITABLE_ERRNOS, not_writable

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        one_line_warnings()
        try:
            return command(*args, **kwargs)
        except (ConfigError, CacheFault) as e:
            fail(e)
        except OSError as e:
            if e.errno in NOT_WRITABLE_ERRNOS and e.filename:
                fail(not_writable(Path(e.filename).parent, e))
            if e.errno not in DISK_FULL_ERRNOS:
                raise
            fail(f"no space left on device ({e.filename or e}); free space and rerun: committed work is kept")

    return wrapper
