"""Errors shared by every stage.

`ConfigError` is the user's mistake (a flag, a path, an input): the CLI prints it as one line and exits
with code 2. `SampleSkipped` is a per-item failure: the item is dropped and counted by `reason`.
"""

from __future__ import annotations


class ConfigError(Exception):
    """Bad options or inputs. The message names the flag and how to fix it."""


class SampleSkipped(Exception):
    """One sample cannot be used; `reason` is a short snake_case label counted in the shard stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def require_at_least(*checks: tuple[str, float, float]) -> None:
    """`require_at_least(("--steps", steps, 1), ...)`: a ConfigError for the first value under its bound."""
    for flag, value, lowest in checks:
        if value < lowest:
            raise ConfigError(f"{flag} must be at least {lowest}")
