"""Where `trainers gan` gets its batches (the cache loader in real runs, an in-memory fake in tests and
benchmarks), and what it checks and records of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from trainers.families.gan.model import check_resolution
from trainers.runtime.distributed import SINGLE, World

if TYPE_CHECKING:
    from trainers.families.gan.config import GanConfig


@dataclass
class DataSource:
    """Where batches come from: the cache loader in real runs, an in-memory fake in tests and benchmarks."""

    batches: Callable[
        [int], Iterator[dict]
    ]  # start_step -> infinite batches, as trainers.data.loader.make_loader
    clip_model: str  # the CLIP the conditions live in (core.clip.load_clip arguments)
    clip_pretrained: str
    h_dim: int


def cache_source(config: GanConfig, world: World = SINGLE) -> DataSource:
    from feature_cache.embed_rows import cache_clip
    from trainers.data.loader import cache_loader_config, make_loader

    if config.cache is None:
        raise ConfigError(
            "--cache is required: the feature cache made by `pipeline embed` (or pass --resume)"
        )
    clip = cache_clip(config.cache)
    loader_config = cache_loader_config(config)
    return DataSource(
        lambda start_step: make_loader(loader_config, start_step=start_step, world=world),
        clip.clip_model,
        clip.clip_pretrained,
        int(clip.dim),
    )


def first_batch_shape(first: dict) -> tuple[int, int]:
    """(resolution, condition dim) of the cache's batches; a non-square or odd size is refused early."""
    _, _, height, width = first["image"].shape
    if height != width:
        raise ConfigError(
            f"--cache: images are {width}x{height}; the GAN needs square images "
            "(rerun `pipeline embed` with --image-size 64)"
        )
    try:
        check_resolution(int(height))
    except ValueError as e:
        raise ConfigError(
            f"--cache: {e} (rerun `pipeline embed` with --image-size 32, 64, 128 or 256)"
        ) from None
    return int(height), int(first["cond"].shape[1])


def data_record(batches: Iterator[dict]) -> tuple[dict[str, Any] | None, list[str] | None]:
    """Which rows the run trains on (`trainers.data.loader.LoaderInfo.record`) and its real pairs' keys (with
    --paired-limit); None for an in-memory source."""
    info = getattr(batches, "info", None)
    return (info.record(), info.pair_keys) if info is not None else (None, None)
