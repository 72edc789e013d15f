"""CLIP loading through open_clip, shared by every stage and trainer.

`--clip-model` is an open_clip architecture name (`ViT-B-32`), one of the configs bundled in
`pipeline/clip_configs/` (`lafite-tiny`, `lafite-small`), or a model-config JSON file. `--clip-pretrained`
is an open_clip tag (`openai`, `laion2b_s34b_b79k`), a local checkpoint file, or empty for random
weights (seeded, so two runs agree). The `identity` dict fingerprints both for the manifests.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests.digest import digest_file_content, digest_json
from pipeline.errors import ConfigError

BUNDLED_CONFIGS = Path(__file__).parent / "clip_configs"
RANDOM_WEIGHTS_SEED = 0


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


def _builtin_models() -> set[str]:
    """open_clip's architecture names, read from its config folder without importing it (~3 s of torch)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    folders = spec.submodule_search_locations if spec else None
    return {p.stem for folder in folders or [] for p in (Path(folder) / "model_configs").glob("*.json")}


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
    if clip_model not in _builtin_models():
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


def weights_identity(model_name: str, clip_pretrained: str | None) -> str:
    if not clip_pretrained:
        return f"random:{RANDOM_WEIGHTS_SEED}"
    path = Path(clip_pretrained)
    if path.is_file():
        return f"file:{digest_file_content(path)}"
    return f"tag:{clip_pretrained}"


def load_clip(clip_model: str, clip_pretrained: str | None = None, device: str = "auto") -> ClipBundle:
    """Load an open_clip model in eval mode. Errors are `ConfigError`s naming the flag and the fix."""
    import open_clip
    import torch

    name, model_identity = resolve_model(clip_model)
    torch_device = resolve_device(device)
    pretrained = clip_pretrained or None
    if pretrained is None:
        warnings.warn(
            f"--clip-pretrained not given: {clip_model} has random weights (fine for tests, useless for "
            "real features)",
            stacklevel=2,
        )
    elif not Path(pretrained).is_file():
        if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in pretrained:
            raise ConfigError(f"--clip-pretrained {pretrained}: checkpoint file not found")
        if not open_clip.get_pretrained_cfg(name, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(
                f"--clip-pretrained {pretrained}: not a file and not an open_clip tag for {clip_model}"
                + (f" (tags: {', '.join(tags)})" if tags else "")
            )
    torch.manual_seed(RANDOM_WEIGHTS_SEED)  # random weights are part of the identity: make them reproducible
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=torch_device, weights_only=True)
    except RuntimeError as e:
        if "download" in str(e).lower():
            raise ConfigError(
                f"--clip-pretrained {pretrained}: could not download the weights (no network?). Download "
                f"them on a connected machine and pass the file: --clip-pretrained /path/to/checkpoint.bin"
            ) from None
        raise ConfigError(f"--clip-pretrained {pretrained}: cannot load into {clip_model}: {e}") from None
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
    """The manifest identity of a model without loading it (cheap: used for staleness checks)."""
    name, _, model_identity = model_config(clip_model)
    return {"model": model_identity, "weights": weights_identity(name, clip_pretrained or None)}


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
