"""Progress bars (core/progress.py and every bar built on it): plain lines off a terminal, and on an
80-column terminal one line per bar with the counts, times and ETA intact."""

from __future__ import annotations

import io
import re
import time
from contextlib import contextmanager

import pytest
from factories import TINY_CLIP
from rich.console import Console
from typer.testing import CliRunner

from cli.pipeline import app
from core import progress

LINE = re.compile(r"^(?P<desc>[\w -]+): (?P<done>[\d,]+)(/(?P<total>[\d,]+))? (?P<unit>\w+)")


def plain_console(monkeypatch, every: float = 0.0) -> Console:
    """stderr as a log file (not a terminal); `every` 0: a line on every update."""
    console = Console(file=io.StringIO(), force_terminal=False, width=80)
    monkeypatch.setattr(progress, "stderr", console)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", every, raising=False)
    return console


def lines_of(console: Console) -> list[str]:
    return console.file.getvalue().splitlines()


def test_off_a_terminal_a_bar_prints_plain_lines_once_work_starts(monkeypatch):
    console = plain_console(monkeypatch)
    with pytest.raises(ValueError), progress.progress_bar("clip", total=10, unit="step"):
        raise ValueError("a bad flag, found before any work")  # the error stays the only line
    assert lines_of(console) == []

    with progress.progress_bar("embed", total=1000, unit="img") as advance:
        advance(100, [])
        time.sleep(0.05)
        advance(400, ["decode_error"])
    lines = lines_of(console)
    assert lines[0].startswith("embed: 100/1,000 img (10%)"), lines
    assert re.fullmatch(
        r"embed: 500/1,000 img \(50%\), [\d,]+ img/s, elapsed 0:00:00, eta 0:00:\d\d, dropped 1", lines[1]
    ), lines
    assert len(lines) == 2  # the end adds no copy of the last line


def test_off_a_terminal_lines_come_every_n_seconds_and_at_the_end(monkeypatch):
    console = plain_console(monkeypatch, every=0.2)
    with progress.progress_bar("optimize", total=None, unit="img") as advance:
        for _ in range(6):
            advance(10, [])
            time.sleep(0.05)
    lines = lines_of(console)
    assert lines[0].startswith("optimize: 10 img"), lines  # the start
    assert 2 <= len(lines) <= 4, lines  # ~0.3 s at one line per 0.2 s, then the end
    assert lines[-1].startswith("optimize: 60 img,"), lines


def test_the_rate_and_eta_start_after_the_first_step_not_at_start_up(monkeypatch):
    """A run whose start-up (a model, the first batch) is long beside its steps: the first line has no
    ETA rather than one counting start-up as work (`clip: 1/3,000 step, eta 5 days`), and the next lines
    give the rate of the steps alone."""
    console = plain_console(monkeypatch)
    clock = [100.0]
    with progress.make_progress(*progress.bar_columns("drops"), get_time=lambda: clock[0]) as bar:
        task = bar.add_task("clip", total=3000, drops="", unit="step")
        clock[0] += 60.0  # start-up
        bar.update(task, advance=1)
        for _ in range(2):
            clock[0] += 40.0  # steps slower than rich's 30 s speed window: its estimate has one sample
            bar.update(task, advance=1)
    lines = lines_of(console)
    assert lines[0] == "clip: 1/3,000 step (0%), elapsed 0:01:00", lines
    assert lines[1] == "clip: 2/3,000 step (0%), 0.025 step/s, elapsed 0:01:40, eta 1 day, 9:18:40", lines


def test_a_gan_bar_keeps_one_unit_from_start_to_end(monkeypatch, tmp_path):
    """The GAN's bar driven by the trainers' step loop as run_gan drives it: its rate stays in steps/s
    (it once switched to the loop's img/s at the first log step)."""
    from types import SimpleNamespace

    import torch

    from trainers.engine.loop import train_steps
    from trainers.families.gan.train import _progress
    from trainers.runtime.distributed import SINGLE

    class Trainer:
        step, world = 0, SINGLE

        def train_step(self, batch):
            time.sleep(0.01)
            return {"loss_g": torch.tensor(1.0), "loss_d": torch.tensor(2.0)}

        def state_dict(self):
            return {}

    console = plain_console(monkeypatch)
    config = SimpleNamespace(steps=30, log_every=10, checkpoint_every=0)
    batches = iter(lambda: {"image": torch.zeros(4, 3, 8, 8)}, None)
    with _progress(config.steps, 0, True) as advance:
        train_steps(Trainer(), batches, config, tmp_path, {}, advance=advance)
    lines = lines_of(console)
    rates = [re.search(r", ([\d.,]+ [\w/]+), elapsed", line) for line in lines[1:]]
    assert len(rates) >= 2 and all(r and r.group(1).endswith(" step/s") for r in rates), lines


# ---------------------------------------------------------------------------------------------------------
# Every training bar, driven to mid-run with its widest realistic fields
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def drive_progress_bar(description: str, total: int = 20000, unit: str = "step"):
    with progress.progress_bar(description, total=total, unit=unit) as advance:
        advance(12000, [])
        time.sleep(0.05)
        advance(345, ["decode_error"] * 1234)
        yield


@contextmanager
def drive_gan():
    from trainers.families.gan.train import _progress

    with _progress(20000, 12000, True) as advance:
        for i in range(345):
            losses = {"loss_g": 1.234, "loss_d": 0.567, "con_g": 12.3, "con_d": 4.56, "r1": 0.01}
            advance(**({"losses": losses} if i % 10 == 0 else {}))  # as run_gan passes them
            if i == 100:
                time.sleep(0.05)
        yield


@contextmanager
def drive_compare():
    from trainers.compare.run import compare_progress

    with compare_progress() as update:
        update(total_runs=12, total_steps=240000)
        update(steps=12000)
        time.sleep(0.05)
        update(steps=345)
        update(runs=2)
        time.sleep(0.05)
        update(runs=1)
        update(status="optimize-s2: train")
        yield


BARS = {
    "clip": lambda: drive_progress_bar("clip"),
    "probe": lambda: drive_progress_bar("probe"),
    "vae": lambda: drive_progress_bar("vae"),
    "vae --encode": lambda: drive_progress_bar("vae --encode", 1_000_000, "img"),
    "ldm": lambda: drive_progress_bar("ldm"),
    "gan": drive_gan,
    "compare": drive_compare,
}


def final_frame(raw: str) -> list[str]:
    """The lines of the last frame a live display drew (each redraw starts by erasing its lines)."""
    last = re.split(r"\r\x1b\[2K(?:\x1b\[1A\x1b\[2K)*", raw)[-1]
    return re.sub(r"\x1b\[\?25[hl]", "", last).rstrip("\n").split("\n")


@pytest.mark.parametrize("name", BARS)
def test_training_bars_fit_80_columns_and_show_the_eta(monkeypatch, name):
    console = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    monkeypatch.setattr(progress, "stderr", console)
    with BARS[name]():
        pass
    frame = final_frame(console.file.getvalue())
    n_tasks = 2 if name == "compare" else 1
    assert len(frame) == n_tasks, frame  # nothing wrapped onto a second line
    for line in frame:
        assert len(line) <= 80, line
        assert re.search(r"\beta \d+:\d\d:\d\d\b", line), line  # the ETA, whole
        assert re.search(r"\d+:\d\d:\d\d eta", line), line  # the elapsed time, whole
        assert re.search(r"\b\d+/\d+\b", line), line  # done/total, whole
    assert "12345/" in frame[-1], frame


@pytest.mark.parametrize("name", BARS)
def test_training_bars_print_plain_lines_off_a_terminal(monkeypatch, name):
    console = plain_console(monkeypatch)
    with BARS[name]():
        pass
    lines = lines_of(console)
    pattern = r"12,345/[\d,]+ \w+ \(\d+%\), .*elapsed \d+:\d\d:\d\d, eta \d+:\d\d:\d\d"
    assert any(re.search(pattern, line) for line in lines), lines


# ---------------------------------------------------------------------------------------------------------
# Totals known before the work: embed's samples to run, the probe's steps
# ---------------------------------------------------------------------------------------------------------


def test_embed_and_optimize_bar_totals_are_the_samples_of_the_shards_to_run(tmp_path, monkeypatch):
    runner = CliRunner()
    synth = ["synth", "--out", tmp_path / "w", "--n", 20, "--shard-size", 8, "--n-captions", 40]
    assert runner.invoke(app, [str(a) for a in [*synth, "--image-size", 32]]).exit_code == 0
    embed = ["embed", "--cache", tmp_path / "c", "--clip-model", TINY_CLIP, "--clip-pretrained", ""]
    embed += ["--image-size", 32, "--workers", 0]
    console = plain_console(monkeypatch)
    result = runner.invoke(app, [str(a) for a in [*embed, tmp_path / "w" / "00000.tar"]])
    assert result.exit_code == 0, result.output
    assert lines_of(console)[-1].startswith("embed: 8/8 img (100%)"), lines_of(console)

    console = plain_console(monkeypatch)  # the two new tars only: 8 + 4 samples
    result = runner.invoke(app, [str(a) for a in [*embed, f"{tmp_path / 'w'}/*.tar"]])
    assert result.exit_code == 0, result.output
    assert lines_of(console)[-1].startswith("embed: 12/12 img (100%)"), lines_of(console)

    console = plain_console(monkeypatch)  # optimize's total: the embed rows of its shards to run
    result = runner.invoke(app, ["optimize", "--cache", str(tmp_path / "c"), "--method", "perturb"])
    assert result.exit_code == 0, result.output
    assert lines_of(console)[-1].startswith("optimize: 20/20 img (100%)"), lines_of(console)


def test_probe_bar_total_is_its_training_steps(monkeypatch):
    from trainers.probe.config import ProbeConfig
    from trainers.probe.probe import train_probe

    console = plain_console(monkeypatch)
    config = ProbeConfig(image_size=16, n_train=64, epochs=2, batch_size=16, n_eval=0, device="cpu")
    with progress.progress_bar("probe", total=None, unit="step") as advance:
        train_probe(config, advance)
    match = re.match(r"probe: ([\d,]+)/([\d,]+) step \(100%\)", lines_of(console)[-1])
    assert match and match.group(1) == match.group(2), lines_of(console)
