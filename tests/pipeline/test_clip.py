"""CLIP loading: bundled configs, config files, local checkpoints, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from factories import TINY_CLIP

from pipeline.clip import clip_identity, encode_images, encode_texts, load_clip
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
