"""Which weights `--clip-pretrained` names, and whether they can be had: open_clip's pretrained tags (read
without importing open_clip's model code), the identity the manifests record, and the Hugging Face hub's
files, asked for once within HUB_TIMEOUT_S, or found in the local cache (core/clip.py has the whole story).
`check_weights` runs these checks without building the model, so a command can stop before it writes
anything."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from core.clip_models import model_config
from core.errors import ConfigError
from manifests.digest import digest_file_content

AUTO = "auto"  # --clip-pretrained's default
AUTO_TAG = "openai"  # what `auto` picks where open_clip has it
HUB_TIMEOUT_S = 3.0  # to find out whether the hub answers at all: name lookup and TCP connect together
HUB_URL = "https://huggingface.co"  # where a user on another machine downloads from (not HF_ENDPOINT's)
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"  # open_clip's default weights file in a hub repo
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"  # ... and its twin, which open_clip tries first


RANDOM_WEIGHTS_FIX = (
    "or use a bundled config with random weights (--clip-model lafite-tiny --clip-pretrained '')"
)


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


def pretrained_tags(name: str) -> list[str]:
    return pretrained_table().list_pretrained_tags_by_model(name)


def resolve_pretrained(clip_model: str, clip_pretrained: str | None) -> str:
    """The --clip-pretrained value to load: `auto` -> `openai` where open_clip has that tag for the model,
    else '' (random weights); anything else as given ('' for None)."""
    if clip_pretrained != AUTO:
        return clip_pretrained or ""
    name, cfg, _ = model_config(clip_model)
    if cfg is not None:  # a config of our own (bundled or a JSON file): open_clip publishes no weights
        return ""
    return AUTO_TAG if AUTO_TAG in pretrained_tags(name) else ""


def weights_identity(model_name: str, clip_pretrained: str | None) -> str:
    """Of a resolved --clip-pretrained value (`resolve_pretrained`)."""
    if not clip_pretrained:
        return f"random:{RANDOM_WEIGHTS_SEED}"
    path = Path(clip_pretrained)
    if path.is_file():
        return f"file:{digest_file_content(path)}"
    return f"tag:{clip_pretrained}"


def hub_files(cfg: dict[str, Any]) -> tuple[str, list[str]] | None:
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
    hub = hub_files(cfg)
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
        connect_once(target.hostname or "", port, HUB_TIMEOUT_S)
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


def connect_once(host: str, port: int, timeout: float) -> None:
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
def hub_offline():
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


def check_tag_weights(clip_model: str, name: str, tag: str, flag: str) -> bool:
    """Whether the tag's weights are on disk; a ConfigError at once when they are not and the hub cannot
    be reached (huggingface_hub would retry for about a minute, printing each retry twice)."""
    found, reason = tag_weights(name, tag)
    if reason is not None:
        raise ConfigError(
            f"{flag}: could not download {clip_model}'s {tag} weights: they are not in the local cache and "
            f"{reason}; " + offline_fix(name, tag)
        )
    return found is not None


def check_pretrained(clip_model: str, clip_pretrained: str | None) -> tuple[str, str, bool]:
    """(resolved --clip-pretrained, the flag as errors name it, whether a tag's weights are on disk), or a
    ConfigError: a checkpoint file that is not CLIP weights, a tag unknown or not downloadable."""
    name = model_config(clip_model)[0]
    pretrained = resolve_pretrained(clip_model, clip_pretrained)
    flag = f"--clip-pretrained {clip_pretrained}" + (f" ({pretrained})" if clip_pretrained == AUTO else "")
    if not pretrained:
        return pretrained, flag, False
    if Path(pretrained).is_file():
        check_checkpoint_file(pretrained, clip_model)
        return pretrained, flag, False
    if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in pretrained:
        raise ConfigError(f"{flag}: checkpoint file not found")
    if not pretrained_table().get_pretrained_cfg(name, pretrained):
        tags = pretrained_tags(name)
        raise ConfigError(
            f"{flag}: not a file and not an open_clip tag for {clip_model}"
            + (f" (tags: {', '.join(tags)})" if tags else "")
        )
    return pretrained, flag, check_tag_weights(clip_model, name, pretrained, flag)


def check_weights(clip_model: str, clip_pretrained: str | None) -> None:
    """`load_clip`'s checks of the model and its weights, without building it: for a command to stop
    before it writes anything. Offline, one probe of the hub (none with HF_HUB_OFFLINE)."""
    check_pretrained(clip_model, clip_pretrained)


def check_checkpoint_file(path: str, clip_model: str) -> None:
    """A readable torch file holding a CLIP state dict (possibly under "state_dict"), or a one-line
    ConfigError. Memory-mapped, so a large file costs little to check before open_clip loads it."""
    import torch

    from core.torch_files import load_torch_file

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


RANDOM_WEIGHTS_SEED = 0
