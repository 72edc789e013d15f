"""`--help` of both CLIs: flags read as flags, commands listed in the order a user runs them."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from cli.pipeline import app as pipeline_app
from cli.trainers import app as trainers_app

APPS = {"pipeline": pipeline_app, "trainers": trainers_app}


def help_lines(cli: str, *args: str) -> list[str]:
    result = CliRunner().invoke(APPS[cli], [*args, "--help"])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


@pytest.mark.parametrize(
    "cli, command, flags, valued",
    [
        ("pipeline", "embed", ("--force", "--verify", "--repair", "--dry-run", "--help"), "--batch-size"),
        ("pipeline", "run", ("--verify", "--dry-run"), "--until"),
        ("trainers", "gan", ("--allow-partial", "--dry-run", "--help"), "--steps"),
        ("trainers", "clip", ("--force",), "--steps"),
    ],
)
def test_flags_show_no_value_type(cli, command, flags, valued):
    lines = help_lines(cli, command)
    for flag in flags:
        line = next(line for line in lines if re.search(rf"\s{flag}\s", line))
        assert "<" not in line, line  # no `<bool>`: a flag takes no value
    assert re.search(r"<\w+>", next(line for line in lines if f" {valued} " in line))  # value types stay


def listed_commands(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if "Commands" in line)
    return [m.group(1) for line in lines[start + 1 :] if (m := re.match(r"^│ ([a-z]+)\s", line))]


def test_pipeline_help_lists_commands_in_the_order_they_are_run():
    assert listed_commands(help_lines("pipeline")) == [
        "init",
        "synth",
        "embed",
        "retrieve",
        "optimize",
        "run",
        "status",
        "doctor",
        "demo",
    ]


def test_trainers_help_lists_commands_in_the_order_they_are_run():
    order = ["clip", "probe", "gan", "vae", "ldm", "dvae", "dalle", "sample", "eval", "compare"]
    assert listed_commands(help_lines("trainers")) == order
