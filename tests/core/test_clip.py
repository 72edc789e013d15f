"""CLIP loading: bundled configs, config files, local checkpoints, and clear errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
from bad_torch_files import bad_torch_files
from factories import TINY_CLIP
from typer.testing import CliRunner

from cli.pipeline import app
from core.clip import clip_identity, encode_images, encode_texts, load_clip
from core.clip_weights import cached_weights_file, resolve_pretrained
from core.errors import ConfigError
from pipeline.embed.config import EmbedConfig


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


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty hub cache, HF_HUB_OFFLINE unset, the hub at an address nothing listens on, every TCP connect
    refused and counted (`socket.socket.connect` is what socket.create_connection, urllib3 and httpx call),
    and open_clip's model build a test failure: a command must stop before it."""
    import socket

    import open_clip
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    connects = []

    def refuse(sock, address):
        connects.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    def build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(open_clip, "create_model", build)
    return connects


def test_offline_default_fails_after_one_connect_in_one_line_writing_nothing(tmp_path, image_folder, no_hub):
    """The shipped default (ViT-B-32, auto -> openai) with no weights on disk and no network: one connection
    attempt (huggingface_hub's retries made dozens), one line naming the file to download and its repo,
    exit 2, and the first run leaves no cache behind (no .lock, no embed/_plan.json)."""
    cache = tmp_path / "c"
    result = CliRunner().invoke(app, ["embed", str(image_folder), "--cache", str(cache), "--workers", "0"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: --clip-pretrained auto (openai): could not download ViT-B-32's openai")
    assert "127.0.0.1 cannot be reached (Connection refused)" in lines[0]
    assert (
        "open_clip_model.safetensors from the Hugging Face repo timm/vit_base_patch32_clip_224.openai"
        in lines[0]
    )
    assert "--clip-pretrained /path/to/open_clip_model.safetensors" in lines[0]
    assert "--clip-pretrained ''" in lines[0]
    assert no_hub == [("127.0.0.1", 9)]
    assert not cache.exists()


def test_pipeline_run_checks_the_weights_before_it_takes_the_lock(tmp_path, image_folder, no_hub):
    """`pipeline run` holds the cache lock while its stages run: a first embed that cannot load its CLIP
    stops before the lock, so it leaves no cache folder, lock or plan."""
    from pipeline.run import RunConfig, run_pipeline, stage_configs

    cache = tmp_path / "c"
    sections = {"embed": {"inputs": [str(image_folder)], "workers": 0}, "optimize": {"method": "perturb"}}
    configs = stage_configs(sections, cache, ())
    with pytest.raises(ConfigError, match="could not download ViT-B-32's openai weights"):
        run_pipeline(configs, RunConfig(cache, until="embed"))
    assert no_hub == [("127.0.0.1", 9)] and not cache.exists()


def test_hf_hub_offline_fails_without_trying_the_hub(monkeypatch, no_hub):
    import socket

    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: lookups.append(args) or [])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="--clip-pretrained openai: could not download .*HF_HUB_OFFLINE"):
        load_clip("ViT-B-32", "openai", "cpu")  # the model is never built (no_hub)
    assert no_hub == [] and lookups == []


def test_a_name_lookup_that_hangs_is_given_up_after_the_timeout(monkeypatch):
    """getaddrinfo has no timeout (a resolver that did not answer held the reporter's embed for 28 s): the
    probe gives up on it after HUB_TIMEOUT_S and says so, and never connects."""
    import socket
    import threading

    from huggingface_hub import constants

    import core.clip_weights

    released = threading.Event()

    def hanging_lookup(*args, **kwargs):
        released.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def connect(sock, address):
        raise AssertionError("connected without an address")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(core.clip_weights, "HUB_TIMEOUT_S", 0.05)
    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    try:
        reason = core.clip_weights.offline_reason()
    finally:
        released.set()  # let the abandoned lookup thread end
    assert reason == "hub.invalid cannot be reached (the name lookup of hub.invalid timed out after 0.05 s)"


def test_the_error_names_the_file_and_repo_that_clip_pretrained_loads(tiny, tmp_path):
    """The weights file the offline error (and `pipeline doctor`) tells the user to download is one
    `--clip-pretrained FILE` loads: a state dict in a .safetensors file of that name."""
    import open_clip
    from safetensors.torch import save_file

    from core.clip_weights import offline_fix, weights_download

    file, url, source = weights_download("ViT-B-32", "openai")
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    assert repo == "timm/vit_base_patch32_clip_224.openai"
    assert (file, source) == ("open_clip_model.safetensors", f"the Hugging Face repo {repo}")
    assert url == f"https://huggingface.co/{repo}/resolve/main/open_clip_model.safetensors"
    assert f"download {file} from {source} ({url})" in offline_fix("ViT-B-32", "openai")
    assert f"--clip-pretrained /path/to/{file}" in offline_fix("ViT-B-32", "openai")
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, tmp_path / file)
    loaded = load_clip(TINY_CLIP, str(tmp_path / file), "cpu")
    texts = ["a small red circle"]
    torch.testing.assert_close(encode_texts(loaded, texts), encode_texts(tiny, texts))


def test_offline_embed_in_a_fresh_process_imports_no_model_code(tmp_path, image_folder):
    """As a user runs it: HF_ENDPOINT read from the environment at import, and the failure found without
    importing open_clip's model code (torchvision, timm: 2.9-5.4 s on 2 busy cores) or writing the cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path))
    env.update(HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), OMP_NUM_THREADS="1")
    code = (
        "import sys\nfrom cli.pipeline import main\nsys.argv[0] = 'pipeline'\ntry:\n    main()\nfinally:\n"
        "    print([m for m in ('open_clip', 'torchvision', 'timm') if m in sys.modules])"
    )
    command = [sys.executable, "-c", code, "embed", str(image_folder), "--cache", str(tmp_path / "c")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and "127.0.0.1 cannot be reached" in lines[0], lines
    assert done.stdout.strip() == "[]"
    assert not (tmp_path / "c").exists()


def test_a_cache_made_with_empty_pretrained_is_up_to_date_under_auto(tmp_path, image_folder):
    args = ["embed", str(image_folder), "--cache", str(tmp_path / "c"), "--workers", "0"]
    args += ["--clip-model", TINY_CLIP, "--image-size", "32"]
    first = CliRunner().invoke(app, [*args, "--clip-pretrained", ""])
    assert first.exit_code == 0 and "1 shard(s) made" in first.output, first.output
    again = CliRunner().invoke(app, args)  # the default, auto: random weights for lafite-tiny
    assert again.exit_code == 0 and "0 shard(s) made, 1 up to date" in again.output, again.output


def _tiny_tag_in_a_hub_cache(tiny, tmp_path, monkeypatch) -> dict:
    """A tag `test` registered for lafite-tiny, its weights (returned) placed in a hub cache; HF_HUB_OFFLINE
    unset and every connect a test failure (huggingface_hub would otherwise ask the hub first)."""
    import socket

    import open_clip
    from huggingface_hub import constants

    from core.clip_models import model_config

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
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    return state


def _no_network(sock, address):
    raise AssertionError(f"connected to {address}")


def test_a_tag_in_the_local_hub_cache_loads_without_asking_the_hub(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    state = _tiny_tag_in_a_hub_cache(tiny, tmp_path, monkeypatch)
    loaded = load_clip(TINY_CLIP, "test", "cpu")
    assert loaded.identity["weights"] == "tag:test"
    torch.testing.assert_close(loaded.model.state_dict()["text_projection"], state["text_projection"])
    assert constants.HF_HUB_OFFLINE is False  # only for the load


def test_an_up_to_date_cache_reruns_offline_without_the_weights(tiny, tmp_path, image_folder, monkeypatch):
    """Only a first embed checks the weights before planning: a rerun with nothing stale needs no model,
    so it still succeeds once the weights are gone and the hub is off; a stale shard then fails, one line."""
    from huggingface_hub import constants

    import core.clip

    _tiny_tag_in_a_hub_cache(tiny, tmp_path, monkeypatch)
    args = [
        "embed",
        str(image_folder),
        "--cache",
        str(tmp_path / "c"),
        "--workers",
        "0",
        "--image-size",
        "32",
    ]
    args += ["--clip-model", TINY_CLIP, "--clip-pretrained", "test"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "1 shard(s) made" in first.output, first.output
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 shard(s) made, 1 up to date" in again.output, again.output
    monkeypatch.setattr(core.clip, "_LOADED", {})  # a fresh process: not the model the first run loaded
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 2 and "HF_HUB_OFFLINE is set" in forced.output, forced.output
