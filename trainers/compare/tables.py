"""The Markdown tables of the comparison's reports: numbers, mean ± spread cells, and the table itself."""

from __future__ import annotations


def number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.{max(digits - 2, 1)}f}"


def cell(s: dict[str, float | None], spread: bool = True) -> str:
    """'0.512 ± 0.021 (0.497-0.527)': mean ± std over seeds (min-max); one seed: the value alone."""
    if s["mean"] is None:
        return "-"
    text = number(s["mean"])
    if s["std"] is not None:
        text += f" ± {number(s['std'])}"
        if spread:
            text += f" ({number(s['min'])}-{number(s['max'])})"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
