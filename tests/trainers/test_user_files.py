"""Every `trainers` flag naming a user's file: an unreadable one is one line, exit 2, no traceback."""

from __future__ import annotations

import pytest
from bad_torch_files import bad_torch_files
from factories import tiny_cache
from typer.testing import CliRunner

from cli.trainers import app

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    binary = folder / "prompts.txt"
    binary.write_bytes(bytes(range(128, 256)))  # not UTF-8
    return {**{k: v[0] for k, v in bad_torch_files(folder).items()}, "binary": binary}


@pytest.mark.parametrize(
    ("command", "flag", "file", "message"),
    [
        ("gan", "--resume", "jpeg", "a JPEG image"),
        ("gan", "--resume", "truncated", "truncated"),
        ("gan", "--prompts", "binary", "cannot read it"),
        ("ldm", "--vae", "jpeg", "a JPEG image"),
        ("ldm", "--init", "numpy_inside", "refuses"),
    ],
)
def test_unreadable_file_is_one_line(cache, files, tmp_path, command, flag, file, message):
    path = files[file]
    args = [command, "--cache", str(cache), "--out", str(tmp_path / "runs"), "--steps", "1", flag, str(path)]
    if command == "ldm" and flag != "--vae":
        args += ["--vae", str(files["jpeg"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"{flag} {path}: " in lines[0] and message in lines[0], lines[0]
