"""Rich progress bars for long stages: items/s, ETA and drops by reason, on stderr."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True)


def bar_columns(field: str) -> list:
    """Description, bar, done/total, the task's `rate` field, elapsed, ETA, then the task's `field`."""
    return [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn(f"{{task.fields[{field}]}}"),
    ]


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "img") -> Iterator:
    """Yields `advance(n, dropped_reasons)`; shows the rate and the drop counts as work proceeds."""
    drops: Counter = Counter()
    columns = bar_columns("drops")
    with Progress(*columns, console=stderr, transient=False, disable=not stderr.is_terminal) as bar:
        task = bar.add_task(description, total=total, drops="", rate="")

        def advance(n: int, dropped: list[str] = ()) -> None:
            drops.update(dropped)
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            rate = f"{speed:,.0f} {unit}/s" if speed else ""
            text = f"dropped {sum(drops.values())}" if drops else ""
            bar.update(task, drops=text, rate=rate)

        yield advance


@contextmanager
def null_progress(description: str = "", total: int | None = None, unit: str = "") -> Iterator:
    """`progress_bar`'s shape, showing nothing: for callers without a terminal (Dask tasks, the demo)."""
    yield lambda n=0, dropped=(): None


def describe_drops(dropped: dict[str, int]) -> str:
    if not dropped:
        return "none dropped"
    parts = ", ".join(f"{reason} {n:,}" for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
    return f"{sum(dropped.values()):,} dropped ({parts})"
