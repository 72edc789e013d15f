"""CLIP loading: bundled configs, config files, local checkpoints, and clear errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from bad_torch_files import bad_torch_files
from factories import TINY_CLIP
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.clip import (
    cached_weights_file,
    clip_identity,
    encode_images,
    encode_texts,
    load_clip,
    resolve_pretrained,
)
from pipeline.embed_config import EmbedConfig
from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY_CLIP, None, "cpu")


def test_bundled_tiny_config_loads_with_reproducible_random_weights(tiny):
    again = load_clip(TINY_CLIP, None, "cpu")
    assert tiny.dim == 64 and tiny.image_size == 32 and tiny.context_length == 32
    assert tiny.identity["weights"] == "random:0"
    texts = ["a small red circle", "a large blue square"]
    torch.testing.assert_close(encode_texts(tiny, texts), encode_texts(again, texts))
    emb = encode_images(tiny, torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8))
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_local_checkpoint_gives_the_same_embeddings(tiny, tmp_path):
    torch.manual_seed(123)
    for p in tiny.model.parameters():  # weights that differ from the seeded random init
        p.data.add_(0.01 * torch.randn_like(p))
    ckpt = tmp_path / "clip.pt"
    torch.save({"state_dict": tiny.model.state_dict()}, ckpt)
    loaded = load_clip(TINY_CLIP, str(ckpt), "cpu")
    assert loaded.identity["weights"].startswith("file:")
    texts = ["a tiny crimson disc on the left"]
    torch.testing.assert_close(encode_texts(loaded, texts), encode_texts(tiny, texts))
    random_again = load_clip(TINY_CLIP, None, "cpu")
    assert not torch.allclose(encode_texts(random_again, texts), encode_texts(loaded, texts))


def test_model_config_json_file_and_identity_follow_content(tmp_path):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "my-model.json"
    path.write_text(json.dumps(cfg))
    bundle = load_clip(str(path), None, "cpu")
    assert bundle.dim == 32 and bundle.context_length == 16
    moved = tmp_path / "renamed.json"
    moved.write_text(json.dumps({"model_cfg": cfg}))  # open_clip_config.json layout, other name
    assert clip_identity(str(moved), None) == clip_identity(str(path), None)
    cfg["embed_dim"] = 48
    path.write_text(json.dumps(cfg))
    assert clip_identity(str(path), None) != clip_identity(str(moved), None)


def test_mismatched_checkpoint_is_a_config_error(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"state_dict": {"nonsense": torch.zeros(2)}}, ckpt)
    with pytest.raises(ConfigError, match="cannot load"):
        load_clip(TINY_CLIP, str(ckpt), "cpu")


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        ("not-a-model", None, "unknown open_clip architecture"),
        ("missing.json", None, "file not found"),
        (TINY_CLIP, "/no/such/checkpoint.pt", "checkpoint file not found"),
        ("RN50", "no_such_tag", "not a file and not an open_clip tag"),
    ],
)
def test_bad_model_arguments_name_the_flag(model, pretrained, message):
    with pytest.raises(ConfigError, match=message):
        load_clip(model, pretrained, "cpu")


def test_failed_download_says_how_to_pass_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not download.*--clip-pretrained /path/to"):
        load_clip("RN50", "openai", "cpu")


def test_cuda_device_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="--device cuda"):
        load_clip(TINY_CLIP, None, "cuda")


# ---------------------------------------------------------------------------------------------------------
# Unreadable checkpoints, `--clip-pretrained auto`, and failing fast offline
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jpeg", "truncated", "numpy_inside", "empty"])
def test_unreadable_checkpoint_is_one_line_naming_flag_file_and_problem(tmp_path, name):
    path, message = bad_torch_files(tmp_path)[name]
    with pytest.raises(ConfigError, match=message) as caught:
        load_clip(TINY_CLIP, str(path), "cpu")
    assert str(caught.value).startswith(f"--clip-pretrained {path}: ") and "\n" not in str(caught.value)


def test_a_checkpoint_of_another_kind_is_one_line(tmp_path):
    ckpt = tmp_path / "gan.pt"
    torch.save({"kind": "gan", "G_ema": {"mapping.weight": torch.zeros(4, 4)}, "step": 3}, ckpt)
    with pytest.raises(ConfigError, match="cannot load into lafite-tiny") as caught:
        load_clip(TINY_CLIP, str(ckpt), "cpu")
    assert "\n" not in str(caught.value)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # a bare tensor: not a state dict at all
    with pytest.raises(ConfigError, match="not a state dict"):
        load_clip(TINY_CLIP, str(tmp_path / "tensor.pt"), "cpu")


def test_cli_embed_with_a_jpeg_as_checkpoint_is_one_line(tmp_path, image_folder):
    path, _ = bad_torch_files(tmp_path)["jpeg"]
    args = ["embed", str(image_folder), "--cache", str(tmp_path / "c"), "--workers", "0"]
    result = CliRunner().invoke(app, [*args, "--clip-model", TINY_CLIP, "--clip-pretrained", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--clip-pretrained {path}: a JPEG image" in lines[0], result.output


def test_auto_picks_openai_weights_where_open_clip_has_them_and_keeps_the_identity():
    assert (
        clip_identity("RN50", "auto")
        == clip_identity("RN50", "openai")
        == {
            "model": "RN50",
            "weights": "tag:openai",
        }
    )
    assert clip_identity("convnext_tiny", "auto")["weights"] == "random:0"  # no openai weights
    assert clip_identity(TINY_CLIP, "auto") == clip_identity(TINY_CLIP, "") == clip_identity(TINY_CLIP, None)
    assert resolve_pretrained("RN50", "auto") == "openai" and resolve_pretrained(TINY_CLIP, "auto") == ""
    assert EmbedConfig(inputs=("x",), cache="c").clip_pretrained == "auto"


def test_auto_without_weights_warns_once_and_open_clip_stays_quiet(caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        bundle = load_clip(TINY_CLIP, device="cpu")  # the default: auto
    assert bundle.identity == clip_identity(TINY_CLIP, "")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no pretrained weights for lafite-tiny" in messages[0], messages
    assert "not given" not in messages[0]
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_explicit_empty_pretrained_means_random_weights_without_a_warning(caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        bundle = load_clip(TINY_CLIP, "", "cpu")
    assert bundle.identity["weights"] == "random:0"
    assert [str(w.message) for w in caught] == []
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_weights_in_the_local_hub_cache_are_found_without_the_network(tmp_path, monkeypatch):
    """The hub cache layout: models--ORG--NAME/snapshots/REV/FILE, refs/main naming REV."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--timm--resnet50_clip.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    weights = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    weights.write_bytes(b"x")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cached_weights_file("RN50", "openai") == weights
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert cached_weights_file("RN50", "openai") is None


def test_offline_default_fails_in_seconds_with_one_line(tmp_path, image_folder):
    """The shipped default (ViT-B-32, auto -> openai) with no weights on disk and no network: the hub is an
    address nothing listens on (as offline here; HF_HUB_OFFLINE unset, so the hub would be tried)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path))
    env["OMP_NUM_THREADS"] = "1"
    code = "import sys; from pipeline.cli import main; sys.argv[0] = 'pipeline'; main()"
    command = [sys.executable, "-c", code, "embed", str(image_folder), "--cache", str(tmp_path / "c")]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1, lines
    assert "--clip-pretrained auto" in lines[0] and "could not download" in lines[0]
    assert "--clip-pretrained /path/to/" in lines[0] and "--clip-pretrained ''" in lines[0]
    assert seconds < 20, seconds  # ~50 s of hub retries before


def test_hf_hub_offline_fails_without_trying_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("socket.create_connection", _no_network)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="--clip-pretrained openai: could not download .*HF_HUB_OFFLINE"):
        load_clip("ViT-B-32", "openai", "cpu")
    assert time.perf_counter() - t0 < 2  # not even the model is built


def _no_network(*args, **kwargs):
    raise AssertionError("the hub was contacted")


def test_a_cache_made_with_empty_pretrained_is_up_to_date_under_auto(tmp_path, image_folder):
    args = ["embed", str(image_folder), "--cache", str(tmp_path / "c"), "--workers", "0"]
    args += ["--clip-model", TINY_CLIP, "--image-size", "32"]
    first = CliRunner().invoke(app, [*args, "--clip-pretrained", ""])
    assert first.exit_code == 0 and "1 shard(s) made" in first.output, first.output
    again = CliRunner().invoke(app, args)  # the default, auto: random weights for lafite-tiny
    assert again.exit_code == 0 and "0 shard(s) made, 1 up to date" in again.output, again.output


def test_a_tag_in_the_local_hub_cache_loads_without_asking_the_hub(tiny, tmp_path, monkeypatch):
    """A tag registered for lafite-tiny, its weights placed in a hub cache: loaded with the hub unreachable
    and HF_HUB_OFFLINE unset (huggingface_hub would otherwise ask the hub first)."""
    import open_clip
    from huggingface_hub import constants

    from pipeline.clip import model_config

    name = model_config(TINY_CLIP)[0]
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {"test": {"hf_hub": "org/tiny/"}})
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    torch.manual_seed(5)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in tiny.model.state_dict().items()}
    torch.save(state, snapshot / "open_clip_pytorch_model.bin")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("socket.create_connection", _no_network)
    loaded = load_clip(TINY_CLIP, "test", "cpu")
    assert loaded.identity["weights"] == "tag:test"
    torch.testing.assert_close(loaded.model.state_dict()["text_projection"], state["text_projection"])
    assert constants.HF_HUB_OFFLINE is False  # only for the load
