"""Every command's defaults are its config's: an option whose name is a config field defaults to the
field's default, and an option that defaults to None (the config decides) says the same value in its
`(default: X)` help. So a default is changed in one place, the config dataclass."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import typer

from pipeline.cli import app as pipeline_app
from pipeline.embed import EmbedConfig
from pipeline.optimize import OptimizeConfig
from pipeline.synth import SynthConfig
from trainers.cli import app as trainers_app
from trainers.evaluate import EvalConfig
from trainers.probe import ProbeConfig
from trainers.sample import SampleConfig
from trainers.train_dalle import DalleConfig
from trainers.train_dvae import DvaeConfig
from trainers.train_gan import GanConfig
from trainers.train_ldm import LdmConfig
from trainers.vae import VaeConfig

COMMANDS = [
    (pipeline_app, "synth", SynthConfig),
    (pipeline_app, "embed", EmbedConfig),
    (pipeline_app, "optimize", OptimizeConfig),
    (trainers_app, "gan", GanConfig),
    (trainers_app, "ldm", LdmConfig),
    (trainers_app, "dvae", DvaeConfig),
    (trainers_app, "dalle", DalleConfig),
    (trainers_app, "vae", VaeConfig),
    (trainers_app, "probe", ProbeConfig),
    (trainers_app, "sample", SampleConfig),
    (trainers_app, "eval", EvalConfig),
]
HELP_DEFAULT = re.compile(r"\(default: ([^)]*)\)")


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _field_defaults(cls) -> dict:
    """Field -> default, for fields with a fixed one (a default_factory is decided at run time)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def _same(said: str, expected) -> bool:
    """`(default: 1e-4)` says 0.0001; `(default: 20000)` says 20_000."""
    said = said.replace(",", "").strip()
    if isinstance(expected, bool) or not isinstance(expected, int | float):
        return said == str(expected)
    try:
        return float(said) == float(expected)
    except ValueError:
        return False


@pytest.mark.parametrize("app, name, config", COMMANDS, ids=[f"{a.info.name}-{n}" for a, n, _ in COMMANDS])
def test_command_defaults_are_the_configs(app, name, config):
    command = typer.main.get_command(app).commands[name]
    defaults = _field_defaults(config)
    checked = 0
    for param in command.params:
        if param.name not in defaults or param.name in ("cache", "out", "inputs"):
            continue
        expected = defaults[param.name]
        if param.default is not None:
            assert _plain(param.default) == _plain(expected), f"{name} --{param.name}"
            checked += 1
        elif (said := HELP_DEFAULT.search(param.help or "")) and isinstance(expected, int | float | str):
            assert _same(said.group(1), expected), f"{name} --{param.name}: help says {said.group(1)}"
            checked += 1
    assert checked, f"{name}: no option matched a config field"
