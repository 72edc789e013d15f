"""The checks of the options the trainer configs share (`check_run_options`, which their validate()
calls). Light on purpose: the configs (trainers/*_config.py) are read for every trainer's --help, so
nothing here imports torch or numpy at import time (check_compile_backend imports torch._dynamo when a
--compile is given, check_condition numpy when a --condition is checked).
"""

from __future__ import annotations

import math
from typing import Any

from core.errors import ConfigError, require_at_least
from trainers.runtime.runs import check_run_name

# (flag, field, lowest): the counts of the trainer configs that have the field
RUN_MINIMUMS = (
    ("--seed", "seed", 0),
    ("--workers", "workers", 0),
    ("--checkpoint-every", "checkpoint_every", 0),
    ("--log-every", "log_every", 1),
    ("--sample-every", "sample_every", 0),
    ("samples_per_prompt", "samples_per_prompt", 1),
)
RUN_SHARES = (("--cond-drop", "cond_drop"), ("--dropout", "dropout"), ("ema_decay", "ema_decay"))  # in [0, 1)


def check_run_options(
    config: Any,
    sizes: dict,
    *minimums: tuple[str, float, float],
    min_batch: int = 1,
    needs_cache: bool = True,
) -> None:
    """The checks of the options trainer configs share, for those a config has: --size a `sizes` key,
    --condition, --name, then at least their bounds --steps, --batch-size (`min_batch`), RUN_MINIMUMS and
    the trainer's `minimums` (`require_at_least` triples); --lr > 0, --paired-fraction and the RUN_SHARES
    shares, --paired-limit >= 1, --cache given (`needs_cache`), and not both --init and --resume."""
    if config.size not in sizes:
        raise ConfigError(f"--size {config.size}: choose one of {', '.join(sizes)}")
    if hasattr(config, "condition"):
        from trainers.data.conditions import check_condition

        check_condition(config.condition)
    check_run_name(config.name)
    require_at_least(
        ("--steps", config.steps, 1),
        ("--batch-size", config.batch_size, min_batch),
        *(
            (flag, getattr(config, name), lowest)
            for flag, name, lowest in RUN_MINIMUMS
            if hasattr(config, name)
        ),
        *minimums,
    )
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):  # None: the size's
        raise ConfigError("--lr must be a positive number")
    if hasattr(config, "prompts") and not config.prompts:
        raise ConfigError("--prompts: the file has no prompts (one per line)")
    if not 0.0 <= getattr(config, "paired_fraction", 0.0) <= 1.0:
        raise ConfigError("--paired-fraction must be between 0 and 1")
    for flag, name in RUN_SHARES:
        if not 0.0 <= getattr(config, name, 0.0) < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1)")
    if getattr(config, "paired_limit", None) is not None and config.paired_limit < 1:
        raise ConfigError("--paired-limit must be at least 1")
    if needs_cache and config.cache is None:
        resume = " (or --resume)" if hasattr(config, "resume") else ""
        raise ConfigError(f"--cache is required: the feature cache made by `pipeline embed`{resume}")
    if getattr(config, "init", None) is not None and getattr(config, "resume", None) is not None:
        raise ConfigError("--init starts a new run from weights; --resume continues one: give one")
    if getattr(config, "compile", None):
        check_compile_backend(config.compile)


def check_compile_backend(backend: str) -> None:
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):  # debug backends (aot_eager) included
        choices = ", ".join(torch._dynamo.list_backends())
        raise ConfigError(f"--compile {backend}: not a torch.compile backend; choose {choices} or aot_eager")
