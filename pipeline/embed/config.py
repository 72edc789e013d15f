"""`pipeline embed`'s config: its options and their defaults, checked, and which of them are keyed. The stage
is pipeline/embed/stage.py.

Light on purpose: `pipeline embed`'s signature reads its defaults from `EmbedConfig` when cli/pipeline.py is
imported, before the root callback sets the thread count (core.processes.start_threads) and for every
command, so nothing here may import numpy, PIL or torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.paths import recorded_path
from inputs.limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, IMAGE_FORMATS


@dataclass(frozen=True)
class EmbedConfig:
    inputs: tuple[str, ...]  # folders, image files, .tar shards, .parquet files; globs and {a..b} braces
    cache: Path = Path("cache")  # the feature cache directory
    clip_model: str = "ViT-B-32"  # open_clip architecture, bundled config name, or model-config JSON
    clip_pretrained: str = "auto"  # auto (openai where open_clip has it), tag, checkpoint file; "": random
    image_size: int = 256  # stored training resolution (centre-crop + resize); 0 keeps the source size
    image_format: str = "jpg"  # how stored images are encoded (sources already right are kept as-is)
    quality: int = 95  # JPEG/WebP quality of re-encoded images
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (decompression-bomb guard)
    max_aspect: float = DEFAULT_MAX_ASPECT  # long side / short side above this is skipped (the crop loses it)
    shard_size: int = 10_000  # images per shard for folder inputs (a tar or Parquet file is one shard)
    batch_size: int = 256  # images per CLIP forward pass (not keyed: does not change the output)
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))  # decoders (threads in Dask)
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda", "cuda:1"
    verify: bool = False  # hash input and output contents instead of trusting size + mtime
    force: bool = False  # remake every shard even when up to date
    repair: bool = False  # rebuild a damaged shard plan (_plan.json) from the committed manifests
    key_prefix: str = "none"  # none | input | TEMPLATE with {input}, {parent}, {stem} (sources.key_prefix)

    def validate(self) -> None:
        from inputs.units import check_key_prefix  # tarfile: not for every command's import

        if not self.inputs:
            raise ConfigError("give at least one INPUT (a folder, image files, .tar or .parquet files)")
        if self.image_size < 0 or self.image_size > 8192:
            raise ConfigError("--image-size must be between 0 (keep source size) and 8192")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ConfigError("--quality must be between 1 and 100")
        for flag, value in (("--batch-size", self.batch_size), ("--shard-size", self.shard_size)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1")
        if self.workers < 0:
            raise ConfigError("--workers must be 0 (decode in the main process) or more")
        if self.max_pixels < 1:
            raise ConfigError("--max-pixels must be positive")
        if not 1 <= self.max_aspect < math.inf:  # NaN fails too
            raise ConfigError("--max-aspect must be a finite number of at least 1 (long side / short side)")
        check_key_prefix(self.key_prefix)

    def keyed_params(self, identity: dict[str, str]) -> dict[str, Any]:
        """The params that change the output: a change remakes every shard."""
        return {
            "clip_model": identity["model"],
            "clip_weights": identity["weights"],
            "image_size": self.image_size,
            "image_format": self.image_format,
            "quality": self.quality,
            "max_pixels": self.max_pixels,
            # none leaves keys as they are: caches made before the option stay up to date
            **({} if self.key_prefix == "none" else {"key_prefix": self.key_prefix}),
            # likewise at its default: caches made before the option are not re-embedded (--force does).
            # float(): pipeline.toml's `10` and the flag's 10.0 must give one key.
            **({} if self.max_aspect == DEFAULT_MAX_ASPECT else {"max_aspect": float(self.max_aspect)}),
        }

    def unkeyed_params(self) -> dict[str, Any]:
        # The model arguments as given: later stages load the same CLIP from them (a moved file does not
        # stale the cache; the keyed identity above is content-based).
        return {
            "clip_model_arg": recorded_path(self.clip_model),
            "clip_pretrained_arg": recorded_path(self.clip_pretrained),
            "batch_size": self.batch_size,
            "workers": self.workers,
            "device": self.device,
        }
