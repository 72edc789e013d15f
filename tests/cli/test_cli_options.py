"""cli/options.py: a trainer's --help says its config's defaults without the CLI importing the
configs (torch, numpy) first; the options given reach the config; the resumable trainers' shared body."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from cli.common import given_options
from cli.options import SHOWN, say_defaults, train
from cli.trainers import app


def _help_text(*args: str) -> str:
    """--help as one line of words: the panels' borders and wrapping taken out."""
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_trainers_cli_loads_neither_torch_nor_numpy_before_the_root_callback():
    """The root callback sets the threads torch and numpy's BLAS start with (core.processes), so the
    CLI must not import them (nor, so, the trainers' configs) before it runs; `trainers --help` stays
    instant."""
    code = (
        "import sys; from typer.testing import CliRunner; from cli.trainers import app; "
        "CliRunner().invoke(app, ['--help']); "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


CONFIGURED = ("gan", "eval", "vae", "ldm", "clip", "probe", "dvae", "dalle")  # cls=defaults_from(...)


def test_a_trainers_help_loads_neither_torch_nor_numpy():
    """A trainer's --help reads its config's defaults: the configs live in light modules (gan_config.py,
    ...), so `trainers gan --help` does not import torch (1.3 s on 2 cores) to print them."""
    code = (
        "import sys; from typer.testing import CliRunner; from cli.trainers import app\n"
        f"for name in {CONFIGURED!r}:\n"
        "    result = CliRunner().invoke(app, [name, '--help'])\n"
        "    assert result.exit_code == 0 and 'default: ' in result.output, result.output\n"
        "    print(name, sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:-1] == [f"{name} []" for name in CONFIGURED]


@pytest.mark.parametrize(
    "command, says",
    [
        ("gan", "Total steps (a resume continues to it). [default: 20000]"),
        ("dalle", "Total steps (a resume continues to it). [default: 50000]"),
        ("ldm", "Total steps. [default: 50000]"),
        ("vae", "Optimisation steps. [default: 10000]"),
        ("clip", "Pairs per step (the InfoNCE negatives), in whole contrast groups. [default: 129]"),
        ("eval", "Images generated (and real images compared). [default: 1000]"),
    ],
)
def test_help_says_the_configs_default(command, says):
    assert says in _help_text(command)
    assert f"[default: {SHOWN}]" not in _help_text(command)


def test_help_follows_a_changed_config_default(monkeypatch):
    from trainers.families.gan.config import GanConfig

    steps = GanConfig.__dataclass_fields__["steps"]
    monkeypatch.setattr(steps, "default", 123)
    assert "Total steps (a resume continues to it). [default: 123]" in _help_text("gan")


def test_say_defaults_fills_in_shown_options():
    shown = SimpleNamespace(name="steps", help="Steps.", default=None, show_default=SHOWN)
    plain = SimpleNamespace(name="seed", help="Seed.", default=None, show_default=True)
    say_defaults([shown, plain], {"steps": 7, "seed": 1})
    assert (shown.default, shown.show_default) == (7, True)
    assert (plain.help, plain.default) == ("Seed.", None)


def test_given_options_are_those_set():
    options = {"steps": 0, "lr": None, "allow_partial": False, "force": True, "resume": Path("r")}
    assert given_options(options, "resume") == {"steps": 0, "force": True}  # 0 is given; False is not


@dataclass(frozen=True)
class _Config:
    steps: int = 5

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("--steps")

    def to_dict(self) -> dict:
        return {"steps": self.steps}


def _resolve(given, resume):
    return _Config(**given), {"from": resume}


def test_train_dry_run_prints_the_config_and_runs_nothing(capsys):
    def run(config, **kwargs):
        raise AssertionError("a dry run must not train")

    assert train("toy", _resolve, run, {"steps": 3}, None, dry_run=True) is None
    assert json.loads(capsys.readouterr().out) == {"steps": 3}


def test_train_reports_a_run_already_at_its_steps(capsys):
    calls = []

    def run(config, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(run_dir=Path("runs/000-toy"), step=5, losses={})

    assert train("toy", _resolve, run, {}, Path("ck.pt"), bar=False, already="; raise --steps") is None
    assert calls == [{"resume_state": {"from": Path("ck.pt")}}]  # bar=False: the run shows its own
    assert capsys.readouterr().out.strip() == "toy: already at step 5 of 5; raise --steps -> runs/000-toy"


def test_train_returns_the_result_to_report_on_rank_0_only():
    ranks = {0: Path("runs/000-toy"), 1: None}  # a torchrun rank other than 0 has no run dir

    for rank, run_dir in ranks.items():
        result = SimpleNamespace(run_dir=run_dir, step=5, losses={"loss": 1.0})
        done = train("toy", _resolve, lambda config, result=result, **kwargs: result, {}, None)
        assert done is (result if rank == 0 else None)


def test_train_validates_before_running():
    with pytest.raises(ValueError, match="--steps"):
        train("toy", _resolve, lambda config, **kwargs: None, {"steps": 0}, None)
