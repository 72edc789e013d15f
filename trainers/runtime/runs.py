"""What every trainer shares: run directories, device selection, seeding, resuming and sample prompts.

A run lives in `OUT/{idx:03d}-{name}/` (idx one more than the largest already there, so runs sort in the
order they were started) and holds `config.json`, checkpoints `{step:07d}.pt` and sample grids.
"""

from __future__ import annotations

import importlib
import json
import random
import re
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, ClassVar

from core.errors import ConfigError
from core.paths import absolute
from manifests import write_bytes_atomic, write_json_atomic

RUN_DIR_RE = re.compile(r"^(\d{3,})-")

# Default sample-grid prompts: synthetic-world captions, one with a colour/shape pair no image has
# (blue star, see world.labels: held_out_pairs) to watch compositional generalisation.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a large red circle in the centre",
    "a small blue square on the left",
    "a green triangle at the top",
    "a yellow star on the right",
    "a purple diamond near the bottom",
    "an orange cross in the middle",
    "a red square on the left and a green circle on the right",
    "a large blue star in the centre",
)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RunConfig:
    """What the trainers' frozen config dataclasses share: `to_dict` in plain JSON types (config.json,
    and the checkpoint, which must load with weights_only=True: paths absolute, tuples as lists) and
    `from_dict` back (keys it does not know, from older or newer code, are dropped).

    A config whose `--lr` defaults to its size's names the size registry in `SIZES` ("module:NAME", entries
    with an `lr`): `learning_rate` reads it, and `with_learning_rate()` records it as the number trained with.
    """

    SIZES: ClassVar[str | None] = None

    @property
    def learning_rate(self) -> float:
        """--lr, else the size's (the registry is imported when a run starts, not for --help)."""
        if self.lr is not None:
            return self.lr
        module, name = self.SIZES.split(":")
        return getattr(importlib.import_module(module), name)[self.size].lr

    def with_learning_rate(self):
        """This config with `lr` set to the number it trains with (config.json records it); an unknown size
        is left for validate() to name."""
        module, name = self.SIZES.split(":")
        if self.lr is None and self.size in getattr(importlib.import_module(module), name):
            return replace(self, lr=self.learning_rate)
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = absolute(value) if isinstance(value, Path) else _plain(value)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        values = {}
        for f in fields(cls):
            if f.name in d:
                value = d[f.name]
                if value is not None and "Path" in str(f.type):
                    value = Path(value)
                elif isinstance(value, list) and str(f.type).startswith("tuple"):
                    value = tuple(value)
                values[f.name] = value
        return cls(**values)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def select_device(device: str = "auto"):
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N' -> torch.device; anything else, or CUDA on
    a machine without it, is a ConfigError naming --device."""
    from core.clip import resolve_device

    if device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return resolve_device(device)


def check_run_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a folder name)"
        )


def new_run_dir(out: Path, name: str) -> Path:
    """Create `out/{idx:03d}-{name}`; two runs started at once get different indices (mkdir is atomic)."""
    check_run_name(name)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in out.iterdir() if p.is_dir() and (m := RUN_DIR_RE.match(p.name))]
    idx = max(taken, default=-1) + 1
    while True:
        run_dir = out / f"{idx:03d}-{name}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            idx += 1


def write_run_config(run_dir: Path, config: dict[str, Any]) -> Path:
    path = Path(run_dir) / "config.json"
    write_json_atomic(path, config)
    return path


def write_pairs(run_dir: Path, keys: list[str] | None) -> Path | None:
    """`pairs.txt`: the keys of the images a few-shot run was given real captions for, one per line in
    sample order (None: the run had no --paired-limit)."""
    if keys is None:
        return None
    path = Path(run_dir) / "pairs.txt"
    write_bytes_atomic(path, "".join(f"{key}\n" for key in keys).encode())
    return path


def log_metrics(log, step: int, losses: dict[str, Any], **extra: float) -> dict[str, float]:
    """Append one metrics.jsonl line (step, the losses as floats, then `extra`) and flush it; -> the
    losses as floats. Every trainer's log line is written here."""
    values = {k: float(v) for k, v in losses.items()}
    log.write(json.dumps({"step": step, **values, **extra}) + "\n")
    log.flush()
    return values


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop the metrics.jsonl lines past the checkpoint (they are about to be redone), and any
    line that does not parse (a run killed mid-write leaves half a line), with a warning."""
    path = Path(path)
    if not path.exists():
        return
    kept, damaged = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        if not isinstance(step, int):
            damaged += 1
        elif step <= last_step:
            kept.append(line)
    if damaged:
        warnings.warn(f"{path}: dropped {damaged} unreadable line(s)", stacklevel=2)
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's and Python's global generators (model init, noise, augmentation)."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_run_config(
    cls: type, kind: str, overridable: tuple[str, ...], values: dict[str, Any], resume: Path | str | None
) -> tuple[Any, dict | None]:
    """CLI values (only those given) -> a `cls` config; with `resume`, the `trainers {kind}` checkpoint's
    config with the `overridable` values replaced, and the loaded checkpoint (so a big one is read once).
    Any other value given must match the checkpoint's: it shapes the model, the data or the objective, and
    changing it would not be a continuation."""
    from trainers.runtime.checkpoints import load_checkpoint, resolve_checkpoint

    if resume is None:
        return cls(**values), None
    path = resolve_checkpoint(resume, "--resume")
    ckpt = load_checkpoint(path, "--resume", kinds=(kind,))
    saved = cls.from_dict(ckpt["config"])
    overrides = {}
    for key, value in values.items():
        if key in overridable:
            overrides[key] = value
        elif value != getattr(saved, key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{flag} {value}: the checkpoint was trained with {getattr(saved, key)}; a resumed run keeps "
                f"its model, data and objective (drop {flag}, or start a new run without --resume)"
            )
    if "init" in {f.name for f in fields(cls)}:
        overrides["init"] = None  # a continuation starts from its own checkpoint, not the init's
    return replace(saved, **overrides, resume=path), ckpt
