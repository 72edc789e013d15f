"""Progress of long stages on stderr: done/total, rate, elapsed time and ETA, and the drops by reason.

On a terminal each bar is a rich live display that fits in 80 columns: the counts and times are never
cut, the bar and the last field (drops, status, losses) shrink to what is left. Anywhere else (a log
file, CI, `| tee`) the same bars print plain lines instead: when work starts, every `PLAIN_EVERY_S`
seconds, and at the end. A bar that never started (an error found before any work) prints nothing, so
a bad flag stays a one-line error.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

stderr = Console(stderr=True)
PLAIN_EVERY_S = 30.0  # seconds between the plain lines of one bar off a terminal
PLAIN_FIELDS_SKIPPED = ("unit",)  # task fields a plain line shows in its own way


def format_clock(seconds: float | None) -> str:
    """`0:04:31`, or `-:--:--` when unknown."""
    return "-:--:--" if seconds is None else str(timedelta(seconds=max(0, int(seconds))))


def format_rate(per_second: float, unit: str) -> str:
    """`1,234 img/s`, `3.2 step/s`, `0.011 run/s`."""
    return f"{per_second:,.0f} {unit}/s" if per_second >= 10 else f"{per_second:.2g} {unit}/s"


FIRST = "_first"  # task field: (elapsed, completed) at its first progress, where its rate starts


def _speed(task: Task) -> float | None:
    """Items per second: rich's recent-window estimate, else the average since the first progress (a bar
    over steps of minutes advances too rarely for the window). Not since the task started: that would
    count the start-up (loading a model, the first batch) as work, and a 3,000-step run whose first step
    came after a minute of start-up would say `eta 2 days`. None (no ETA yet) until it advanced twice."""
    if task.speed:  # from the samples alone: fixed once the task finishes
        return task.speed
    first = task.fields.get(FIRST)
    elapsed = task.finished_time if task.finished else task.elapsed
    if first is None or elapsed is None or task.completed <= first[1] or elapsed <= first[0]:
        return None
    return (task.completed - first[1]) / (elapsed - first[0])


def eta_seconds(task: Task) -> float | None:
    if task.total is None:
        return None
    if task.finished or task.completed >= task.total:
        return 0.0
    speed = _speed(task)
    return (task.total - task.completed) / speed if speed else None


def rate_text(task: Task) -> str:
    """The speed in the task's unit, the one its count is in (`3.2 step/s` from start to end)."""
    unit, speed = task.fields.get("unit"), _speed(task)
    return format_rate(speed, unit) if unit and speed else ""


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(rate_text(task), style="cyan")


class EtaColumn(ProgressColumn):
    max_refresh = 0.5  # as rich's TimeRemainingColumn: no jitter

    def render(self, task: Task) -> Text:
        return Text(f"eta {format_clock(eta_seconds(task))}" if task.total is not None else "", style="cyan")


class FieldColumn(ProgressColumn):
    """The task's free-text `field`, cut with an ellipsis (never wrapped) to the width the table leaves."""

    def __init__(self, field: str) -> None:
        self.field = field
        super().__init__(table_column=Column(no_wrap=False, overflow="ellipsis"))

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get(self.field, "")), no_wrap=True, overflow="ellipsis")


def bar_columns(field: str) -> list[ProgressColumn]:
    """Description, bar, done/total, rate, elapsed, ETA, then the task's `field`. Only the bar (at most 40
    cells) and `field` may shrink, so at 80 columns the numbers stay whole."""
    return [
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=None, table_column=Column(no_wrap=False, min_width=4, max_width=40)),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        RateColumn(table_column=Column(no_wrap=True)),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        EtaColumn(table_column=Column(no_wrap=True)),
        FieldColumn(field),
    ]


def plain_line(task: Task) -> str:
    """`embed: 1,200/2,000 img (60%), 45 img/s, elapsed 0:00:26, eta 0:00:17, dropped 3`."""
    unit = task.fields.get("unit")
    done = f"{task.completed:,.0f}" + (f"/{task.total:,.0f}" if task.total is not None else "")
    done += f" {unit}" if unit else ""
    done += f" ({task.percentage:.0f}%)" if task.total is not None else ""
    elapsed = task.finished_time if task.finished else task.elapsed
    parts = [f"{task.description}: {done}", rate_text(task), f"elapsed {format_clock(elapsed)}"]
    if task.total is not None and (eta := eta_seconds(task)) is not None:
        parts.append(f"eta {format_clock(eta)}")
    parts += [
        str(v)
        for k, v in task.fields.items()
        if k not in PLAIN_FIELDS_SKIPPED and not k.startswith("_") and v not in ("", None)
    ]
    return ", ".join(p for p in parts if p)


class LineProgress(Progress):
    """rich's Progress on a terminal; elsewhere no live display but plain lines on the same console, per
    task: at its first progress, then at most every `every` seconds as it advances, and at the end."""

    def __init__(self, *columns: ProgressColumn, console: Console, every: float, **kwargs: Any) -> None:
        self.plain = not console.is_terminal
        super().__init__(*columns, console=console, disable=self.plain, **kwargs)
        self.every = every
        self._printed: dict[TaskID, tuple[float, float]] = {}  # task -> (when, done) at its last line

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        before = self._tasks[task_id].completed
        super().update(task_id, **kwargs)
        self._tick(task_id, progressed=self._tasks[task_id].completed != before)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._tick(task_id, progressed=bool(advance))

    def _tick(self, task_id: TaskID, progressed: bool) -> None:
        task = self._tasks[task_id]
        if progressed and FIRST not in task.fields and task.started:  # the rate counts from here
            task.fields[FIRST] = (task.elapsed, task.completed)
        if not self.plain:
            return
        last = self._printed.get(task_id)
        if task.completed and (last is None or time.monotonic() - last[0] >= self.every):
            self._print(task)

    def _print(self, task: Task) -> None:
        self._printed[task.id] = (time.monotonic(), task.completed)
        self.console.print(plain_line(task), markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        super().stop()
        if self.plain:  # the end of each task that started, unless its last line already said it
            for task in self.tasks:
                if task.id in self._printed and task.completed != self._printed[task.id][1]:
                    self._print(task)


def make_progress(*columns: ProgressColumn, **kwargs: Any) -> LineProgress:
    """Every bar of the project: on `stderr`, live on a terminal, plain lines elsewhere. The first says
    when a busy machine lowered the command's threads (core.processes.threads_note)."""
    from core.processes import threads_note

    note = threads_note()
    if note:
        print_line(note)
    return LineProgress(*columns, console=stderr, every=PLAIN_EVERY_S, **kwargs)


class Advance:
    """`advance(n, dropped_reasons)` after each n items; `advance.set_total(n)` once the total is known
    (a stage learns it from its plan)."""

    def __init__(self, bar: Progress, task: TaskID) -> None:
        self.bar, self.task, self.drops = bar, task, Counter()

    def __call__(self, n: int, dropped: list[str] = ()) -> None:
        self.drops.update(dropped)
        text = f"dropped {sum(self.drops.values()):,}" if self.drops else ""
        self.bar.update(self.task, advance=n, drops=text)

    def set_total(self, total: int) -> None:
        self.bar.update(self.task, total=total)


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "img") -> Iterator[Advance]:
    """Yields an `Advance`; shows the rate and the drop counts as work proceeds."""
    with make_progress(*bar_columns("drops")) as bar:
        yield Advance(bar, bar.add_task(description, total=total, drops="", unit=unit))


@contextmanager
def null_progress(description: str = "", total: int | None = None, unit: str = "") -> Iterator:
    """`progress_bar`'s shape, showing nothing: for callers without a terminal (Dask tasks)."""
    yield lambda n=0, dropped=(): None


def print_line(text: str) -> None:
    """One plain line on stderr, beside the bars: a milestone a log should keep."""
    stderr.print(text, markup=False, highlight=False, soft_wrap=True)


def describe_drops(dropped: dict[str, int]) -> str:
    if not dropped:
        return "none dropped"
    parts = ", ".join(f"{reason} {n:,}" for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
    return f"{sum(dropped.values()):,} dropped ({parts})"
