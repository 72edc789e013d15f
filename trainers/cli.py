"""The `trainers` command: generators trained from the frozen feature cache.

The trainers themselves (clip, gan, ldm, sample, eval) are tracked in the project's issues 6 and 7 and
are not built yet; this app exists so the console script is installed and documented.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Train generators from the feature cache (clip, gan, ldm, sample, eval: not built yet).",
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def main() -> None:
    app()
