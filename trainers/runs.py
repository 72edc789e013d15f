"""Run directories and device selection, shared by every trainer.

A run lives in `OUT/{idx:03d}-{name}/` (idx one more than the largest already there, so runs sort in the
order they were started) and holds `config.json`, checkpoints `{step:07d}.pt` and sample grids.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from manifests import write_bytes_atomic, write_json_atomic
from pipeline.errors import ConfigError

RUN_DIR_RE = re.compile(r"^(\d{3,})-")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def select_device(device: str = "auto"):
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N' -> torch.device; anything else, or CUDA on
    a machine without it, is a ConfigError naming --device."""
    from pipeline.clip import resolve_device

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
