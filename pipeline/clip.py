"""CLIP loading through open_clip, shared by every stage and trainer.

`--clip-model` is an open_clip architecture name (`ViT-B-32`), one of the configs bundled in
`pipeline/clip_configs/` (`lafite-tiny`, `lafite-small`), or a model-config JSON file. `--clip-pretrained`
is `auto` (the default: the model's `openai` weights where open_clip has them, otherwise random weights
with a warning), an open_clip tag (`openai`, `laion2b_s34b_b79k`), a local checkpoint file, or empty for
random weights (seeded, so two runs agree). The `identity` dict fingerprints both for the manifests; `auto`
has the identity of what it resolves to, so a cache made with `openai` or `''` stays up to date.

A tag's weights come from the local Hugging Face cache when they are there (the hub is not asked); else
the hub is tried once, name lookup and connect within HUB_TIMEOUT_S, and an unreachable hub (or
HF_HUB_OFFLINE) is one error line naming the file to download and its repo, rather than huggingface_hub's
minute of retries. `check_weights` runs those checks without building the model (or importing open_clip's
model code), so a command can stop before it writes anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests.digest import digest_file_content, digest_json
from pipeline.errors import ConfigError

BUNDLED_CONFIGS = Path(__file__).parent / "clip_configs"
RANDOM_WEIGHTS_SEED = 0
AUTO = "auto"  # --clip-pretrained's default
AUTO_TAG = "openai"  # what `auto` picks where open_clip has it
HUB_TIMEOUT_S = 3.0  # to find out whether the hub answers at all: name lookup and TCP connect together
HUB_URL = "https://huggingface.co"  # where a user on another machine downloads from (not HF_ENDPOINT's)
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"  # open_clip's default weights file in a hub repo
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"  # ... and its twin, which open_clip tries first
RANDOM_WEIGHTS_FIX = (
    "or use a bundled config with random weights (--clip-model lafite-tiny --clip-pretrained '')"
)


@dataclass
class ClipBundle:
    model: Any  # open_clip CLIP, eval mode, on `device`
    tokenizer: Any  # callable: list[str] -> LongTensor [B, context_length]
    image_size: int  # input resolution of the image tower
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int  # joint embedding dimension
    context_length: int
    device: Any  # torch.device
    identity: dict[str, str]  # {"model": ..., "weights": ...}: what the manifests key on


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ConfigError(f"--clip-model {path}: not a readable model-config JSON ({e})") from None
    cfg = cfg.get("model_cfg", cfg)  # also accept open_clip's open_clip_config.json layout
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ConfigError(f"--clip-model {path}: a model config needs embed_dim, vision_cfg and text_cfg")
    return cfg


def _builtin_config_files() -> dict[str, Path]:
    """open_clip's architecture configs by name, found in its folder without importing it (~3 s of torch)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    folders = spec.submodule_search_locations if spec else None
    return {p.stem: p for folder in folders or [] for p in (Path(folder) / "model_configs").glob("*.json")}


def model_dim(clip_model: str) -> int:
    """The joint embedding width of a --clip-model, read from its config without importing open_clip."""
    _, cfg, _ = model_config(clip_model)
    if cfg is None:
        cfg = json.loads(_builtin_config_files()[clip_model].read_text())
    return int(cfg["embed_dim"])


def model_config(clip_model: str) -> tuple[str, dict[str, Any] | None, str]:
    """(open_clip name, config dict or None for a built-in, model identity), without importing open_clip."""
    path = Path(clip_model)
    if path.suffix != ".json":
        bundled = BUNDLED_CONFIGS / f"{clip_model}.json"
        if bundled.is_file():
            path = bundled
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"--clip-model {clip_model}: file not found")
        cfg = _read_config_file(path)
        identity = digest_json(cfg)
        return f"cfg-{identity[:12]}", cfg, f"config:{identity}"
    if clip_model not in _builtin_config_files():
        raise ConfigError(
            f"--clip-model {clip_model}: unknown open_clip architecture; pass a model-config JSON file "
            f"or one of: lafite-tiny, lafite-small, ViT-B-32, ViT-B-16, ViT-L-14, ..."
        )
    return clip_model, None, clip_model


def resolve_model(clip_model: str) -> tuple[str, str]:
    """Register the config with open_clip when needed; returns (open_clip name, model identity)."""
    name, cfg, identity = model_config(clip_model)
    if cfg is not None:
        # open_clip keeps its configs in a registry by name; `add_model_config` would register the file's
        # stem, which may clash with a built-in name, so register under a content-derived name instead.
        from open_clip import factory

        factory._MODEL_CONFIGS[name] = cfg
    return name, identity


_TAGS_PACKAGE = "_open_clip_tags"  # the name open_clip's pretrained table is loaded under, without open_clip


def pretrained_table():
    """open_clip's table of pretrained tags (its `pretrained` module) without open_clip's model code:
    `import open_clip` also loads torchvision, timm and torch._dynamo, 2.9-5.4 s on top of torch's 1.7-3.4 s
    on 2 busy cores, which the weights checks (a command failing offline, `pipeline doctor`) do not need.
    The module is loaded from open_clip's folder as a submodule of another package name; once open_clip is
    imported (a test may add a tag to it), open_clip's own module is used."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"].pretrained
    if f"{_TAGS_PACKAGE}.pretrained" in sys.modules:
        return sys.modules[f"{_TAGS_PACKAGE}.pretrained"]
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    try:
        package = importlib.machinery.ModuleSpec(_TAGS_PACKAGE, None, is_package=True)
        package.submodule_search_locations = list(spec.submodule_search_locations or [])
        sys.modules[_TAGS_PACKAGE] = importlib.util.module_from_spec(package)
        return importlib.import_module(f"{_TAGS_PACKAGE}.pretrained")
    except Exception:  # noqa: BLE001 - not installed, or another layout of open_clip: import it all (slower)
        for module in [m for m in sys.modules if m == _TAGS_PACKAGE or m.startswith(f"{_TAGS_PACKAGE}.")]:
            del sys.modules[module]
        import open_clip

        return open_clip.pretrained


def _pretrained_tags(name: str) -> list[str]:
    return pretrained_table().list_pretrained_tags_by_model(name)


def resolve_pretrained(clip_model: str, clip_pretrained: str | None) -> str:
    """The --clip-pretrained value to load: `auto` -> `openai` where open_clip has that tag for the model,
    else '' (random weights); anything else as given ('' for None)."""
    if clip_pretrained != AUTO:
        return clip_pretrained or ""
    name, cfg, _ = model_config(clip_model)
    if cfg is not None:  # a config of our own (bundled or a JSON file): open_clip publishes no weights
        return ""
    return AUTO_TAG if AUTO_TAG in _pretrained_tags(name) else ""


def weights_identity(model_name: str, clip_pretrained: str | None) -> str:
    """Of a resolved --clip-pretrained value (`resolve_pretrained`)."""
    if not clip_pretrained:
        return f"random:{RANDOM_WEIGHTS_SEED}"
    path = Path(clip_pretrained)
    if path.is_file():
        return f"file:{digest_file_content(path)}"
    return f"tag:{clip_pretrained}"


# ---------------------------------------------------------------------------------------------------------
# Weights of an open_clip tag: the local cache first, the hub once
# ---------------------------------------------------------------------------------------------------------


def _hub_files(cfg: dict[str, Any]) -> tuple[str, list[str]] | None:
    """(repo id, file names open_clip tries in order) for a tag on the hub: a .safetensors twin first."""
    if not cfg.get("hf_hub"):
        return None
    repo, filename = os.path.split(cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:  # as open_clip.pretrained._get_safe_alternatives
        return repo, [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def weights_download(name: str, tag: str) -> tuple[str, str, str]:
    """(file name, URL, where from) to download a tag's weights by hand for `--clip-pretrained FILE`: for a
    hub repo's default weights its open_clip_model.safetensors (what open_clip itself tries first; it loads
    without unpickling), else the file the tag names; for a URL-only tag, its URL."""
    cfg = pretrained_table().get_pretrained_cfg(name, tag) or {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        file = HF_SAFE_WEIGHTS_NAME if filename in ("", HF_WEIGHTS_NAME) else filename
        return file, f"{HUB_URL}/{repo}/resolve/main/{file}", f"the Hugging Face repo {repo}"
    url = cfg.get("url") or ""
    return os.path.basename(url) or "checkpoint.pt", url, "open_clip's URL for it"


def offline_fix(name: str, tag: str) -> str:
    """What to do when a tag's weights cannot be downloaded here: the file, where from, and the flag."""
    file, url, source = weights_download(name, tag)
    return (
        f"on a connected machine download {file} from {source} ({url}) and pass it: "
        f"--clip-pretrained /path/to/{file}; " + RANDOM_WEIGHTS_FIX
    )


def cached_weights_file(name: str, tag: str) -> Path | None:
    """The tag's weights file where open_clip would find it without the network, or None."""
    cfg = pretrained_table().get_pretrained_cfg(name, tag) or {}
    if cfg.get("file"):
        return Path(cfg["file"]) if Path(cfg["file"]).is_file() else None
    hub = _hub_files(cfg)
    if hub is not None:
        from huggingface_hub import try_to_load_from_cache

        for filename in hub[1]:
            found = try_to_load_from_cache(hub[0], filename)
            if isinstance(found, str):
                return Path(found)
        return None
    url = cfg.get("url")  # open_clip's own download folder for URL-only tags
    path = Path("~/.cache/clip").expanduser() / os.path.basename(url) if url else None
    return path if path is not None and path.is_file() else None


def offline_reason(url: str | None = None) -> str | None:
    """Why the weights cannot be downloaded, found in at most about HUB_TIMEOUT_S (one name lookup and TCP
    connect to the hub, or to the proxy the environment names for it), or None when it answers. `url`: a
    URL-only tag's."""
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if url is None and hub_offline_set():
        return "HF_HUB_OFFLINE is set"
    target = urlsplit(url or constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        _connect_once(target.hostname or "", port, HUB_TIMEOUT_S)
    except TimeoutError as e:
        return f"{target.hostname} cannot be reached ({e})"
    except OSError as e:
        return f"{target.hostname} cannot be reached ({e.strerror or e})"
    return None


def hub_offline_set() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it at import or as the environment says now."""
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or offline


def _connect_once(host: str, port: int, timeout: float) -> None:
    """Open and close one TCP connection to host:port, the name lookup included, within about `timeout`
    seconds, or raise OSError. `socket.create_connection(timeout=)` bounds only the connect: getaddrinfo
    has no timeout, and a resolver that does not answer held the reporter's offline embed for 28 s. So
    the lookup runs in a daemon thread, left behind if it hangs."""
    import socket
    import threading
    import time

    deadline = time.monotonic() + timeout
    found: list = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            found.append(e)

    thread = threading.Thread(target=lookup, name=f"lookup {host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        raise TimeoutError(f"the name lookup of {host} timed out after {timeout:g} s")
    if isinstance(found[0], OSError):
        raise found[0]
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in found[0]:  # as create_connection: each address in turn
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"connecting to {host} timed out after {timeout:g} s")
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(left)
            try:
                sock.connect(address)
                return
            except OSError as e:
                error = e
    raise error


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub in offline mode for the block: a cached file is returned without asking the hub."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def tag_weights(name: str, tag: str) -> tuple[Path | None, str | None]:
    """(the tag's weights file on disk or None, why they cannot be downloaded or None): the local cache
    first; only when they are not there, one probe of the hub (none under HF_HUB_OFFLINE)."""
    found = cached_weights_file(name, tag)
    if found is not None:
        return found, None
    cfg = pretrained_table().get_pretrained_cfg(name, tag) or {}
    return None, offline_reason(None if cfg.get("hf_hub") else cfg.get("url"))


def _check_tag_weights(clip_model: str, name: str, tag: str, flag: str) -> bool:
    """Whether the tag's weights are on disk; a ConfigError at once when they are not and the hub cannot
    be reached (huggingface_hub would retry for about a minute, printing each retry twice)."""
    found, reason = tag_weights(name, tag)
    if reason is not None:
        raise ConfigError(
            f"{flag}: could not download {clip_model}'s {tag} weights: they are not in the local cache and "
            f"{reason}; " + offline_fix(name, tag)
        )
    return found is not None


def _check_pretrained(clip_model: str, clip_pretrained: str | None) -> tuple[str, str, bool]:
    """(resolved --clip-pretrained, the flag as errors name it, whether a tag's weights are on disk), or a
    ConfigError: a checkpoint file that is not CLIP weights, a tag unknown or not downloadable."""
    name = model_config(clip_model)[0]
    pretrained = resolve_pretrained(clip_model, clip_pretrained)
    flag = f"--clip-pretrained {clip_pretrained}" + (f" ({pretrained})" if clip_pretrained == AUTO else "")
    if not pretrained:
        return pretrained, flag, False
    if Path(pretrained).is_file():
        _check_checkpoint_file(pretrained, clip_model)
        return pretrained, flag, False
    if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in pretrained:
        raise ConfigError(f"{flag}: checkpoint file not found")
    if not pretrained_table().get_pretrained_cfg(name, pretrained):
        tags = _pretrained_tags(name)
        raise ConfigError(
            f"{flag}: not a file and not an open_clip tag for {clip_model}"
            + (f" (tags: {', '.join(tags)})" if tags else "")
        )
    return pretrained, flag, _check_tag_weights(clip_model, name, pretrained, flag)


def check_weights(clip_model: str, clip_pretrained: str | None) -> None:
    """`load_clip`'s checks of the model and its weights, without building it: for a command to stop
    before it writes anything. Offline, one probe of the hub (none with HF_HUB_OFFLINE)."""
    _check_pretrained(clip_model, clip_pretrained)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


class _DropOpenClipNotices(logging.Filter):
    """open_clip's root-logger lines that our own warning or error line says instead."""

    NOTICES = ("No pretrained weights loaded", "Failed to download weights for tag")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)


@contextlib.contextmanager
def open_clip_quiet():
    """Drop open_clip's `WARNING:root:No pretrained weights loaded for model 'cfg-...'` (and its failed
    download line) for the block: we say it ourselves, once, where it matters. The placeholder handler
    keeps `logging.warning` from installing a root stderr handler (basicConfig), which would print every
    later log line twice."""
    root = logging.getLogger()
    notice, placeholder = _DropOpenClipNotices(), logging.NullHandler()
    root.addFilter(notice)
    root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(notice)
        root.removeHandler(placeholder)


def _one_line(e: Exception, limit: int = 300) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_checkpoint_file(path: str, clip_model: str) -> None:
    """A readable torch file holding a CLIP state dict (possibly under "state_dict"), or a one-line
    ConfigError. Memory-mapped, so a large file costs little to check before open_clip loads it."""
    import torch

    from pipeline.torch_files import load_torch_file

    ckpt = load_torch_file(path, "--clip-pretrained", expect="a CLIP checkpoint", mmap=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if isinstance(ckpt, dict) and isinstance(ckpt.get("kind"), str) and "state_dict" not in ckpt:
        raise ConfigError(
            f"--clip-pretrained {path}: cannot load into {clip_model}: a `trainers {ckpt['kind']}` "
            "checkpoint, not CLIP weights (`trainers clip` writes RUN/clip.pt)"
        )
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else "a dict of other things"
        raise ConfigError(f"--clip-pretrained {path}: holds {what}, not a state dict of CLIP weights")


def load_clip(clip_model: str, clip_pretrained: str | None = AUTO, device: str = "auto") -> ClipBundle:
    """Load an open_clip model in eval mode. Errors are `ConfigError`s naming the flag and the fix.
    `clip_pretrained`: `auto`, a tag, a checkpoint file, or ''/None for random weights."""
    import open_clip
    import torch

    name, model_identity = resolve_model(clip_model)
    torch_device = resolve_device(device)
    pretrained, flag, hub_cached = _check_pretrained(clip_model, clip_pretrained)
    if not pretrained and clip_pretrained == AUTO:
        warnings.warn(
            f"--clip-pretrained auto: open_clip has no pretrained weights for {clip_model}, so it has "
            "random weights (fine for tests, useless for real features); pass a checkpoint file, or "
            "--clip-pretrained '' to choose random weights without this warning",
            stacklevel=2,
        )
    torch.manual_seed(RANDOM_WEIGHTS_SEED)  # random weights are part of the identity: make them reproducible
    try:
        with open_clip_quiet(), _hub_offline() if hub_cached else contextlib.nullcontext():
            model = open_clip.create_model(
                name, pretrained=pretrained or None, device=torch_device, weights_only=True
            )
    except Exception as e:  # noqa: BLE001 - the file was checked: what is left is its fit to the model
        if not Path(pretrained).is_file() and "download" in str(e).lower():
            raise ConfigError(
                f"{flag}: could not download the weights ({_one_line(e, 160)}); "
                + offline_fix(name, pretrained)
            ) from None
        raise ConfigError(f"{flag}: cannot load into {clip_model}: {_one_line(e)}") from None
    model.eval().requires_grad_(False)
    cfg = open_clip.get_model_config(name)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        image_size=int(size),
        mean=tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
        dim=int(cfg["embed_dim"]),
        context_length=int(cfg["text_cfg"].get("context_length", 77)),
        device=torch_device,
        identity={"model": model_identity, "weights": weights_identity(name, pretrained)},
    )


_LOADED: dict[tuple[str, str, str], ClipBundle] = {}


def cached_clip(clip_model: str, clip_pretrained: str | None, device: str = "auto") -> ClipBundle:
    """One CLIP per process: a Dask worker keeps it across the shards it runs (the last one only)."""
    key = (clip_model, clip_pretrained or "", device)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_clip(clip_model, clip_pretrained or None, device)
    return _LOADED[key]


def clip_identity(clip_model: str, clip_pretrained: str | None) -> dict[str, str]:
    """The manifest identity of a model without loading it (cheap: used for staleness checks; `auto` on
    an open_clip architecture imports open_clip to read its tags, ~3 s)."""
    name, _, model_identity = model_config(clip_model)
    return {
        "model": model_identity,
        "weights": weights_identity(name, resolve_pretrained(clip_model, clip_pretrained)),
    }


def autocast(device):
    """bf16 autocast on CUDA (the image tower runs ~2x faster, features agree to ~1e-2); fp32 on CPU."""
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode_images(bundle: ClipBundle, pixels):
    """uint8 [B, 3, H, W] (any H=W) -> float32 unit-norm [B, D] on the bundle's device."""
    import torch
    import torch.nn.functional as F

    x = pixels.to(bundle.device, non_blocking=True)
    x = x.float().div_(255.0)
    if x.shape[-1] != bundle.image_size or x.shape[-2] != bundle.image_size:
        x = F.interpolate(x, size=(bundle.image_size, bundle.image_size), mode="bicubic", antialias=True)
        x = x.clamp_(0.0, 1.0)
    mean = torch.tensor(bundle.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.inference_mode(), autocast(bundle.device):
        emb = bundle.model.encode_image(x)
    return F.normalize(emb.float(), dim=-1)


def encode_texts(bundle: ClipBundle, texts: list[str]):
    """list of captions -> float32 unit-norm [B, D] on the bundle's device."""
    import torch
    import torch.nn.functional as F

    tokens = bundle.tokenizer(texts).to(bundle.device)
    with torch.inference_mode(), autocast(bundle.device):
        emb = bundle.model.encode_text(tokens)
    return F.normalize(emb.float(), dim=-1)
