"""`load_torch_file`: every unreadable file is one ConfigError line naming the flag, the file and why."""

from __future__ import annotations

import pytest
import torch
from bad_torch_files import bad_torch_files

from core.errors import ConfigError
from core.torch_files import load_torch_file, load_torchscript_file

NAMES = ("jpeg", "empty", "text", "html", "truncated", "truncated_legacy", "pickle", "numpy_inside")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_torch_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", NAMES)
def test_unreadable_files_are_one_line_errors(bad, name):
    path, message = bad[name]
    with pytest.raises(ConfigError, match=message) as caught:
        load_torch_file(path, "--thing")
    text = str(caught.value)
    assert text.startswith(f"--thing {path}: ") and "\n" not in text, text


def test_good_files_load_on_the_cpu_and_missing_ones_say_so(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_torch_file(tmp_path / "ok.pt", "--x")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_torch_file(tmp_path / "legacy.pt", "--x", mmap=True)["w"], torch.ones(2))
    with pytest.raises(ConfigError, match="--x .*nope.pt: file not found"):
        load_torch_file(tmp_path / "nope.pt", "--x")
    with pytest.raises(ConfigError, match="a directory"):
        load_torch_file(tmp_path, "--x")


def test_torchscript_archives_are_told_apart(tmp_path):
    scripted = tmp_path / "script.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    with pytest.raises(ConfigError, match="TorchScript archive"):
        load_torch_file(scripted, "--x")
    assert load_torchscript_file(scripted, "--inception")(torch.zeros(1, 2)).shape == (1, 2)
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(
        ConfigError, match="--inception .*plain.pt: a checkpoint of tensors, not a TorchScript archive"
    ):
        load_torchscript_file(tmp_path / "plain.pt", "--inception")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0junk")
    with pytest.raises(ConfigError, match="a JPEG image"):
        load_torchscript_file(tmp_path / "x.jpg", "--inception")
