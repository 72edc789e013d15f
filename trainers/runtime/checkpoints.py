"""Training checkpoints: `RUN/{step:07d}.pt`, written atomically, loadable with `weights_only=True`.

A checkpoint is a plain dict of tensors and JSON-able values: whatever the trainer puts in (models, EMA,
optimisers, step, config) plus the RNG states of torch (CPU and every CUDA device), numpy and Python, so
a resumed run draws the same random numbers as an uninterrupted one. numpy's and Python's states are
stored as tensors and lists, since the safe unpickler refuses numpy arrays and arbitrary objects.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError
from core.torch_files import load_torch_file
from manifests import atomic_write

CHECKPOINT_RE = re.compile(r"^(\d{7})\.pt$")
# The checkpoint the run in this process would continue from, (path, step): the last it wrote, else the one
# it resumed. What a Ctrl-C names (trainers.engine.loop.launch, which forgets it when the run ends).
_LATEST: list[tuple[Path, int]] = []


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest step first."""
    found = [p for p in Path(run_dir).glob("*.pt") if CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(p.stem))


def resolve_checkpoint(path_or_run: Path | str, flag: str = "--resume") -> Path:
    """A checkpoint file as given, or the latest checkpoint of a run directory."""
    path = Path(path_or_run)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise ConfigError(f"{flag} {path}: the run directory has no {{step:07d}}.pt checkpoint yet")
        return found[-1]
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such checkpoint file or run directory")
    return path


def capture_rng() -> dict[str, Any]:
    """Every global RNG a training step may draw from."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # A run resumed on a machine with fewer GPUs restores the ones it has.
        for i, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def note_checkpoint(path: Path, step: int) -> None:
    """`path`, holding the run after `step` steps, is the one it would continue from (see `_LATEST`)."""
    _LATEST[:] = [(Path(path), int(step))]


def latest_checkpoint() -> tuple[Path, int] | None:
    """(path, step) of the checkpoint the run in this process would continue from; None before one."""
    return _LATEST[-1] if _LATEST else None


def forget_checkpoints() -> None:
    _LATEST.clear()


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write `{step:07d}.pt` atomically (temp file, fsync, rename): a killed run never leaves half a file.
    `state` gets `step` and `rng` added; tensors are saved from wherever they live and load on the CPU."""
    path = checkpoint_path(run_dir, step)
    with atomic_write(path) as f:  # torch.save streams into it: no second in-memory copy
        torch.save({**state, "step": int(step), "rng": capture_rng()}, f)
    note_checkpoint(path, step)
    return path


def load_checkpoint(path: Path, flag: str = "--checkpoint", kinds: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load on the CPU with the safe unpickler; an unreadable file, or one that is not a checkpoint dict
    (of one of `kinds`, when given), is a one-line ConfigError naming the flag."""
    ckpt = load_torch_file(path, flag)
    wanted = " or ".join(f"`trainers {k}`" for k in kinds) or "trainers"
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{flag} {path}: holds a {type(ckpt).__name__}, not a {wanted} checkpoint")
    if kinds and ckpt.get("kind") not in kinds:
        raise ConfigError(f"{flag} {path}: not a {wanted} checkpoint (kind {ckpt.get('kind')!r})")
    return ckpt


def load_init(path: Path | str, kind: str) -> tuple[Path, dict[str, Any]]:
    """The `--init` checkpoint (a file, or a run directory's latest): a `trainers {kind}` one, whose
    weights start a new run (a fresh optimiser, step 0)."""
    path = resolve_checkpoint(path, "--init")
    return path, load_checkpoint(path, "--init", kinds=(kind,))


def require_same_arch(path: Path, theirs: dict[str, Any], ours: dict[str, Any], keys, hint: str) -> None:
    """Refuse an --init checkpoint whose architecture differs from this run's on any of `keys`."""
    diff = [f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in keys if theirs.get(k) != ours.get(k)]
    if diff:
        raise ConfigError(
            f"--init {path}: its architecture does not match this run ({'; '.join(diff)}); {hint}"
        )
