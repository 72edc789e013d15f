"""The embed stage's input pipeline: a torch IterableDataset that reads, decodes and resizes one shard.

Runs in DataLoader worker processes; worker w of W prepares the samples whose index % W == w, and the
stage restores source order afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.errors import SampleSkipped
from pipeline.images import fit_square, prepare_image
from pipeline.sources import RawSample, Skip, Unit, read_unit


@dataclass
class Prepared:
    index: int  # position in the shard's source order
    key: str
    image: bytes  # encoded image to store
    ext: str
    meta: dict[str, Any]  # the sample's json
    pixels: torch.Tensor | None  # uint8 [3, H, W]; None once stacked into a batch


@dataclass
class Dropped:
    index: int
    reason: str


def cache_key(key: str) -> str:
    """WebDataset splits member names at the first dot of the basename: keep keys dot-free there."""
    head, _, base = key.rpartition("/")
    base = base.replace(".", "_")
    return f"{head}/{base}" if head else base


class ShardSamples(torch.utils.data.IterableDataset):
    def __init__(
        self,
        units: list[Unit],
        *,
        image_size: int,
        image_format: str,
        quality: int,
        max_pixels: int,
        clip_size: int,
    ):
        self.units = units
        self.image_size, self.image_format, self.quality = image_size, image_format, quality
        self.max_pixels, self.clip_size = max_pixels, clip_size

    def _raw(self) -> Iterator[RawSample | Skip]:
        for unit in self.units:
            yield from read_unit(unit)

    def __iter__(self) -> Iterator[Prepared | Dropped]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for index, item in enumerate(self._raw()):
            if index % n_workers == worker:
                yield self.prepare(index, item)

    def prepare(self, index: int, item: RawSample | Skip) -> Prepared | Dropped:
        if isinstance(item, Skip):
            return Dropped(index, item.reason)
        try:
            prepared = prepare_image(
                item.data,
                image_size=self.image_size,
                image_format=self.image_format,
                max_pixels=self.max_pixels,
                quality=self.quality,
            )
        except SampleSkipped as e:
            return Dropped(index, e.reason)
        pixels = prepared.pixels
        if self.image_size == 0 and pixels.shape[:2] != (self.clip_size, self.clip_size):
            # Source sizes vary: bring each to the CLIP resolution here so the batch can be stacked.
            pixels = np.asarray(fit_square(Image.fromarray(pixels), self.clip_size))
        meta = {
            "source": item.source,
            "width": prepared.width,
            "height": prepared.height,
            "caption": item.caption,
            "labels": item.labels,
        }
        if prepared.converted:
            meta["converted"] = prepared.converted
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        return Prepared(index, cache_key(item.key), prepared.data, prepared.ext, meta, tensor)


def collate(items: list[Prepared | Dropped]) -> tuple[list[Prepared], list[Dropped], torch.Tensor | None]:
    ok = [it for it in items if isinstance(it, Prepared)]
    pixels = torch.stack([it.pixels for it in ok]) if ok else None
    for it in ok:
        it.pixels = None  # the stacked batch holds them now
    return ok, [it for it in items if isinstance(it, Dropped)], pixels


def shard_loader(dataset: ShardSamples, *, batch_size: int, workers: int, pin_memory: bool):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
    )
