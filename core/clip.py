"""CLIP loading through open_clip, shared by every stage and trainer.

`--clip-model` is an open_clip architecture name (`ViT-B-32`), one of the configs bundled in
`core/clip_configs/` (`lafite-tiny`, `lafite-small`), or a model-config JSON file. `--clip-pretrained`
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
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.clip_models import model_config, resolve_model
from core.clip_weights import (
    AUTO,
    RANDOM_WEIGHTS_SEED,
    check_pretrained,
    hub_offline,
    offline_fix,
    resolve_pretrained,
    weights_identity,
)
from core.errors import ConfigError


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


# ---------------------------------------------------------------------------------------------------------
# Weights of an open_clip tag: the local cache first, the hub once
# ---------------------------------------------------------------------------------------------------------


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


def load_clip(clip_model: str, clip_pretrained: str | None = AUTO, device: str = "auto") -> ClipBundle:
    """Load an open_clip model in eval mode. Errors are `ConfigError`s naming the flag and the fix.
    `clip_pretrained`: `auto`, a tag, a checkpoint file, or ''/None for random weights."""
    import open_clip
    import torch

    name, model_identity = resolve_model(clip_model)
    torch_device = resolve_device(device)
    pretrained, flag, hub_cached = check_pretrained(clip_model, clip_pretrained)
    if not pretrained and clip_pretrained == AUTO:
        warnings.warn(
            f"--clip-pretrained auto: open_clip has no pretrained weights for {clip_model}, so it has "
            "random weights (fine for tests, useless for real features); pass a checkpoint file, or "
            "--clip-pretrained '' to choose random weights without this warning",
            stacklevel=2,
        )
    torch.manual_seed(RANDOM_WEIGHTS_SEED)  # random weights are part of the identity: make them reproducible
    try:
        with open_clip_quiet(), hub_offline() if hub_cached else contextlib.nullcontext():
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
