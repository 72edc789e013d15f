"""How `--help` reads, for both CLIs (`pipeline`, `trainers`): commands in the order a user runs them,
and flags shown as flags."""

from __future__ import annotations

from typer.core import TyperGroup, TyperOption


def ordered_group(order: tuple[str, ...]) -> type[TyperGroup]:
    """A Typer group class (`typer.Typer(cls=...)`) that lists its commands in `order`, then any others in
    the order they were defined; the functions stay where they are in the file."""

    class OrderedGroup(TyperGroup):
        def list_commands(self, ctx) -> list[str]:
            names = super().list_commands(ctx)
            return [n for n in order if n in names] + [n for n in names if n not in order]

    return OrderedGroup


def _show_flags_as_flags() -> None:
    """Typer 0.29's rich help prints the value type of every option, flags included (`--force <bool>`,
    even `--help <bool>`), as if they took a value; its plain help and click leave a flag's type out.
    Leave it out in the rich panels too (a no-op where the type is already left out)."""
    display = getattr(TyperOption, "display_type_rich", None)
    if display is None or getattr(display, "flags_as_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag or self.count else display(self, ctx)

    display_type_rich.flags_as_flags = True
    TyperOption.display_type_rich = display_type_rich


_show_flags_as_flags()
