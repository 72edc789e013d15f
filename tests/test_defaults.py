"""Every command's defaults are its config's: an option whose name is a config field defaults to the
field's default, and an option that defaults to None (the config decides) says the same value in its
`[default: X]`, the one way every help says a default. So a default is changed in one place, the config
dataclass.

The options are read as --help shows them: a trainer's `shown` options (cli/options.py) get their
defaults from the config only when the help is printed."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated

import pytest
import typer

from cli.options import SHOWN
from cli.pipeline import app as pipeline_app
from cli.trainers import app as trainers_app
from pipeline.embed.config import EmbedConfig
from pipeline.optimize.config import OptimizeConfig
from pipeline.retrieve.config import CaptionsConfig, IndexConfig, RetrieveConfig, SearchConfig
from pipeline.run import RunConfig
from trainers.autoencoders.dvae.config import DvaeConfig
from trainers.autoencoders.vae.config import VaeConfig
from trainers.clip.config import ClipTrainConfig
from trainers.compare.config import CompareConfig
from trainers.eval.config import EvalConfig
from trainers.eval.sample import SampleConfig
from trainers.families.dalle.config import DalleConfig
from trainers.families.gan.config import GanConfig
from trainers.families.ldm.config import LdmConfig
from trainers.probe.config import ProbeConfig
from world.synth import SynthConfig

COMMANDS = [
    (pipeline_app, "synth", SynthConfig),
    (pipeline_app, "embed", EmbedConfig),
    (pipeline_app, "optimize", OptimizeConfig),
    (pipeline_app, "run", RunConfig),
    (pipeline_app, "status", RunConfig),  # it reads what `run` makes: the same --cache
    (trainers_app, "clip", ClipTrainConfig),
    (trainers_app, "probe", ProbeConfig),
    (trainers_app, "gan", GanConfig),
    (trainers_app, "vae", VaeConfig),
    (trainers_app, "ldm", LdmConfig),
    (trainers_app, "dvae", DvaeConfig),
    (trainers_app, "dalle", DalleConfig),
    (trainers_app, "sample", SampleConfig),
    (trainers_app, "eval", EvalConfig),
    (trainers_app, "compare", CompareConfig),
]
RETRIEVE = (pipeline_app, "retrieve")  # three step configs: test_retrieve_defaults_are_its_steps_configs
NO_CONFIG = {(pipeline_app, "init"), (pipeline_app, "doctor"), (pipeline_app, "demo")}
SAYABLE = (int, float, str, Path)  # what a help's `(default: X)` can say


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


def _equal(default, expected) -> bool:
    """A comma-separated option (`compare --seeds 0,1`) defaults to its tuple field, joined."""
    if isinstance(default, str) and isinstance(expected, tuple):
        return default == ",".join(map(str, expected))
    return _plain(default) == _plain(expected)


def _help_params(app: typer.Typer, name: str) -> list:
    """The command's options after its --help is made, which puts the `shown` defaults in."""
    command = typer.main.get_command(app).commands[name]
    command.get_help(command.context_class(command, info_name=name))
    return command.params


def check_defaults(app: typer.Typer, name: str, config: type) -> int:
    """Assert that each option of `name` named after a field of `config` defaults to (or says) the field's
    default; -> how many options were checked."""
    defaults = _field_defaults(config)
    checked = 0
    for param in _help_params(app, name):
        said = getattr(param, "show_default", None)
        assert said != SHOWN, (
            f"{name} --{param.name}: its config's default was not put in (cls=defaults_from(...)?)"
        )
        if param.name not in defaults:
            continue
        expected = defaults[param.name]
        if param.default is not None:
            assert _equal(param.default, expected), f"{name} --{param.name}: {param.default} != {expected}"
            checked += 1
        elif isinstance(said, str) and isinstance(expected, SAYABLE):
            if said.startswith("the "):  # decided elsewhere: the preset's, the run's
                continue
            assert _same(said, _plain(expected)), f"{name} --{param.name}: help says {said}"
            checked += 1
    return checked


APP_NAMES = {pipeline_app: "pipeline", trainers_app: "trainers"}


@pytest.mark.parametrize("app, name, config", COMMANDS, ids=[f"{APP_NAMES[a]}-{n}" for a, n, _ in COMMANDS])
def test_command_defaults_are_the_configs(app, name, config):
    assert check_defaults(app, name, config), f"{name}: no option matched a config field"


def test_retrieve_defaults_are_its_steps_configs():
    """`pipeline retrieve` sets up three steps: its defaults, through RetrieveConfig.from_options, make
    each step's config at its own defaults."""
    params = _help_params(*RETRIEVE)
    options = {p.name: p.default for p in params if p.name not in ("captions", "wait", "dry_run")}
    built = RetrieveConfig.from_options(captions=(), **options)
    assert built == RetrieveConfig(CaptionsConfig(corpus=()), IndexConfig(), SearchConfig())


def test_every_command_is_checked():
    listed = {(app, name) for app, name, _ in COMMANDS} | {RETRIEVE} | NO_CONFIG
    for app in (pipeline_app, trainers_app):
        for name in typer.main.get_command(app).commands:
            assert (app, name) in listed, f"{name}: add it to COMMANDS (or NO_CONFIG when it has no config)"


@dataclass(frozen=True)
class _Toy:
    steps: int = 10
    lr: float = 0.1


def test_a_default_changed_in_one_place_only_fails():
    toy = typer.Typer()

    @toy.command()
    def literal(steps: Annotated[int, typer.Option("--steps")] = 11) -> None: ...

    @toy.command()
    def said(
        lr: Annotated[float | None, typer.Option("--lr", help="LR.", show_default="0.2")] = None,
    ) -> None: ...

    for name in ("literal", "said"):
        with pytest.raises(AssertionError):
            check_defaults(toy, name, _Toy)


@pytest.mark.parametrize("app", [pipeline_app, trainers_app], ids=["pipeline", "trainers"])
def test_every_help_says_its_defaults_one_way(app):
    """`[default: X]`, as typer prints it, never a hand-written `(default: X)` beside it."""
    from typer.testing import CliRunner

    for name in typer.main.get_command(app).commands:
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "(default" not in result.output, (name, result.output)
