"""The CLIP architectures `--clip-model` names: open_clip's, the configs bundled in core/clip_configs/, or a
model-config JSON file; each resolved to its open_clip name and config, and its embedding width."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from manifests.digest import digest_json

BUNDLED_CONFIGS = Path(__file__).parent / "clip_configs"


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
