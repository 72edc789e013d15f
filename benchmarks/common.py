"""What every benchmark script records with its rows: date, commit, device; and a CSV appender."""

from __future__ import annotations

import csv
import datetime as dt
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {platform.processor() or platform.machine()} x{__import__('os').cpu_count()}"


def append_rows(name: str, rows: list[dict]) -> Path:
    """Append rows (dicts with the same keys) to benchmarks/results/{name}.csv, header on first write.

    When the rows bring columns the file lacks, the file is rewritten once with the union of the
    columns (earlier rows get empty cells), so old measurements are kept and stay aligned.
    """
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    fields, old_rows = list(dict.fromkeys(k for row in rows for k in row)), []  # union, in first-seen order
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if set(fields) <= set(old_fields):
                with open(path, "a", newline="") as out:
                    csv.DictWriter(out, fieldnames=old_fields).writerows(rows)
                return path
            old_rows = list(reader)
            fields = old_fields + [c for c in fields if c not in old_fields]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old_rows + rows)
    tmp.replace(path)
    return path


def stamp(device: str) -> dict[str, str]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(device),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(widths[c]) for c in columns))
