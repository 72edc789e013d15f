"""The embed stage's input pipeline: a torch IterableDataset that reads, decodes and resizes one shard.

Runs in DataLoader worker processes; worker w of W prepares the samples whose index % W == w, and the
stage restores source order afterwards. A daemonic process (a Dask worker) may not start children, so
there the same W workers are threads, giving the same batches.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.errors import SampleSkipped
from core.processes import limit_threads, loader_worker_init
from inputs.images import fit_square, prepare_image
from inputs.limits import DEFAULT_MAX_ASPECT
from inputs.sources import read_unit
from inputs.units import RawSample, Skip, Unit, key_prefix
from manifests.faults import stall_point


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
    source: str = ""  # the file (tar#key, parquet#row) it came from, named in the shard's stats


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
        key_prefix: str = "none",  # `--key-prefix` (inputs.units.key_prefix)
        max_aspect: float = DEFAULT_MAX_ASPECT,
    ):
        self.units = units
        self.image_size, self.image_format, self.quality = image_size, image_format, quality
        self.max_pixels, self.clip_size, self.key_prefix = max_pixels, clip_size, key_prefix
        self.max_aspect = max_aspect

    def _raw(self) -> Iterator[RawSample | Skip]:
        for unit in self.units:
            prefix = key_prefix(unit, self.key_prefix)
            for item in read_unit(unit):
                yield replace(item, key=prefix + item.key) if prefix and isinstance(item, RawSample) else item

    def __iter__(self) -> Iterator[Prepared | Dropped]:
        info = torch.utils.data.get_worker_info()
        return self.partition(*((info.id, info.num_workers) if info else (0, 1)))

    def partition(self, worker: int, n_workers: int) -> Iterator[Prepared | Dropped]:
        """What worker `worker` of `n_workers` prepares: the samples whose index % n_workers == worker."""
        for index, item in enumerate(self._raw()):
            if index % n_workers == worker:
                yield self.prepare(index, item)

    def prepare(self, index: int, item: RawSample | Skip) -> Prepared | Dropped:
        stall_point("embed:decode")
        if isinstance(item, Skip):
            return Dropped(index, item.reason, item.source)
        try:
            prepared = prepare_image(
                item.data,
                image_size=self.image_size,
                image_format=self.image_format,
                max_pixels=self.max_pixels,
                max_aspect=self.max_aspect,
                quality=self.quality,
            )
        except SampleSkipped as e:
            return Dropped(index, e.reason, item.source)
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
    """Batches of `collate`'s (prepared, dropped, pixels), decoded by `workers` DataLoader processes.

    A daemonic process may not start children ("daemonic processes are not allowed to have children"),
    and Dask worker processes are daemonic, LocalCluster's and `dask worker`'s alike; there the workers
    are threads (`thread_batches`), which give the same batches.
    """
    # Threads rather than non-daemonic Dask workers whose DataLoader could start processes: PIL's decode,
    # resize and encode release the GIL, and a Dask worker's children are spawned, paying a torch import
    # per worker per shard. Inside a child process, 2 workers, 2 CPU cores, lafite-tiny, 1024 images of
    # 512 px stored at 256 in 512-image shards: threads 243 img/s, processes 122, inline (0 workers) 173;
    # 256 px sources kept as-is, 1024-image shards: threads 577, processes 332, inline 588
    # (benchmarks/bench_embed.py --daemon-arms).
    limit_threads(workers)  # CLIP here shares the cores with the decoders
    if workers and multiprocessing.current_process().daemon:
        return thread_batches(dataset, batch_size=batch_size, workers=workers, pin_memory=pin_memory)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        worker_init_fn=loader_worker_init() if workers else None,
    )


_DONE = object()


def thread_batches(
    dataset: ShardSamples, *, batch_size: int, workers: int, pin_memory: bool = False, prefetch: int = 4
) -> Iterator[tuple[list[Prepared], list[Dropped], torch.Tensor | None]]:
    """The DataLoader's batches, from threads: thread w batches `dataset.partition(w, workers)` as worker
    process w would, and batches are taken round-robin over the threads still running, as the
    DataLoader takes them, so every batch holds the same samples (CLIP's output bits may depend on a
    batch's make-up) and arrives in the same order."""
    queues = [queue.Queue(prefetch) for _ in range(workers)]
    stop = threading.Event()

    def put(worker: int, item: Any) -> bool:
        while not stop.is_set():
            try:
                queues[worker].put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False  # the consumer left early

    def fill(worker: int) -> None:
        try:
            items = dataset.partition(worker, workers)
            while batch := list(itertools.islice(items, batch_size)):
                ok, bad, pixels = collate(batch)
                if pin_memory and pixels is not None:
                    pixels = pixels.pin_memory()
                if not put(worker, (ok, bad, pixels)):
                    return
            put(worker, _DONE)
        except BaseException as e:  # re-raised by the consumer, as the DataLoader re-raises a worker's
            put(worker, e)

    threads = [
        threading.Thread(target=fill, args=(w,), name=f"decode-{w}", daemon=True) for w in range(workers)
    ]
    for thread in threads:
        thread.start()
    try:
        running = list(range(workers))
        while running:
            for worker in list(running):
                got = queues[worker].get()
                if got is _DONE:
                    running.remove(worker)
                elif isinstance(got, BaseException):
                    raise got
                else:
                    yield got
    finally:
        stop.set()
        for thread in threads:
            thread.join()
