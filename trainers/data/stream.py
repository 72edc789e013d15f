"""The sample stream and the torch loader over a sample set (trainers/data/loader.py builds the set).

`CacheDataset[positions]` is one whole batch: stream position t is sample perm_e[t % N] of epoch
e = t // N (trainers/data/shuffle.py), with its image, condition (perturbed per (seed, epoch, sample) for
`perturb`, or the real caption's feature when paired), key and paired flag. `BatchPositions` yields step
s's positions (under torchrun, this rank's slice of the global batch) and `CacheLoader` runs them through
a DataLoader, in this process or in workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from manifests.errors import CacheFault
from manifests.faults import stall_point
from trainers.data.conditions import perturb

if TYPE_CHECKING:
    from feature_cache.embed_rows import EmbedRows
    from trainers.data.loader import LoaderInfo

# numpy stream ids under the seed: every random draw is a pure function of (seed, stream, ...)
SHUFFLE_STREAM, NOISE_STREAM, PAIRED_STREAM, POOL_STREAM = 0, 1, 2, 3


class CacheDataset:
    """Map-style dataset indexed by a *list of stream positions*: returns one whole batch dict.

    Sample `j` of the set is embed row `rows_idx[j]`; stream position t is sample perm_e[t % N] of epoch
    e = t // N. Picklable (for spawned workers); arrays are shared copy-on-write with forked ones.
    """

    def __init__(
        self,
        rows: EmbedRows,
        rows_idx: np.ndarray,
        cond: np.ndarray,
        *,
        seed: int,
        perturb_xi: float | None,
        paired_feat: np.ndarray | None,
        paired_pool: np.ndarray,
        paired_probability: float,
    ):
        self.rows = rows
        self.rows_idx = rows_idx  # int64 [N]: embed row of each sample
        self.cond = cond  # float16 [N, D]: the condition (the image embedding itself for perturb)
        self.seed = seed
        self.perturb_xi = perturb_xi
        self.paired_feat = paired_feat  # float16 [N, D] real-caption features (NaN rows outside the pool)
        self.paired_pool = paired_pool  # bool [N]
        self.paired_probability = paired_probability
        self._any_paired = bool(paired_pool.any())  # an array, or a stored set's RowFile

    def __len__(self) -> int:
        return len(self.rows_idx)

    def samples(self, positions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream positions -> (sample index [B], epoch [B], paired [B]). Position t is sample perm_e[t % N]
        of epoch e = t // N, perm_e the permutation of (seed, e) (trainers/data/shuffle.py: O(1) memory); a
        pool
        sample is paired in epoch e by its own draw of (seed, e, sample)."""
        from trainers.data.shuffle import keys, permute, uniform

        n = len(self.rows_idx)
        epochs, at = np.divmod(np.asarray(positions, dtype=np.int64), n)
        samples = np.empty(len(at), dtype=np.int64)
        paired = np.zeros(len(at), dtype=bool)
        for e in np.unique(epochs).tolist():
            here = epochs == e
            samples[here] = permute(at[here], n, keys(self.seed, SHUFFLE_STREAM, e))
            if self._any_paired:
                pool = np.asarray(self.paired_pool[samples[here]], dtype=bool)
                if self.paired_probability < 1.0:
                    draws = uniform(samples[here], keys(self.seed, PAIRED_STREAM, e))
                    pool &= draws < self.paired_probability
                paired[here] = pool
        return samples, epochs, paired

    def __getitem__(self, positions: list[int]) -> dict[str, Any]:
        import torch

        stall_point("trainers:load")
        samples, epochs, paired = self.samples(positions)
        cond = self.cond[samples].astype(np.float32)  # [B, D]
        if self.perturb_xi is not None:
            noise = np.stack(
                [
                    np.random.default_rng([self.seed, NOISE_STREAM, int(e), int(j)]).standard_normal(
                        cond.shape[1]
                    )
                    for e, j in zip(epochs, samples, strict=True)
                ]
            ).astype(np.float32)  # [B, D]
            cond = perturb(cond, noise, self.perturb_xi)
        if paired.any() and self.paired_feat is not None:
            cond[paired] = self.paired_feat[samples[paired]].astype(np.float32)
        cond /= np.maximum(np.linalg.norm(cond, axis=1, keepdims=True), 1e-12)
        rows = self.rows_idx[samples]
        pixels = self.rows.pixels(rows)  # uint8 [B, 3, S, S]
        return {
            "image": pixels.float().div_(127.5).sub_(1.0),  # [B, 3, S, S] in [-1, 1]
            "cond": torch.from_numpy(cond),  # [B, D]
            "key": [self.rows.keys[r] for r in rows.tolist()],
            "paired": torch.from_numpy(paired),  # [B]
        }


class BatchPositions:
    """Infinite sampler of stream positions: step s -> [s*B, (s+1)*B) of the global batch B, or under
    torchrun (trainers/runtime/distributed.py) rank r's contiguous slice of it, [s*B + r*b, s*B + (r+1)*b)."""

    def __init__(self, batch_size: int, start_step: int, rank: int = 0, world_size: int = 1):
        self.batch_size, self.start_step = batch_size, start_step
        self.local = batch_size // world_size
        self.offset = rank * self.local

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            first = step * self.batch_size + self.offset
            yield list(range(first, first + self.local))
            step += 1


def _identity(batch):
    return batch


class CacheLoader:
    """The iterator `make_loader` returns: batches forever; `info` says what was loaded."""

    def __init__(
        self,
        dataset: CacheDataset,
        info: LoaderInfo,
        batch_size: int,
        start_step: int,
        workers: int,
        world: Any = None,
    ):
        import torch

        from core.processes import limit_threads, loader_worker_init
        from trainers.runtime.distributed import SINGLE

        self.dataset, self.info = dataset, info
        self.step = start_step
        limit_threads(workers)  # training here shares the cores with the loader workers
        self._loader = torch.utils.data.DataLoader(
            dataset,
            sampler=BatchPositions(batch_size, start_step, (world or SINGLE).rank, (world or SINGLE).size),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=4 if workers else None,
            pin_memory=torch.cuda.is_available(),  # batches go to the GPU next
            worker_init_fn=loader_worker_init() if workers else None,
            # its own generator: starting to iterate draws a base seed, which would otherwise come from (and
            # shift) the global torch RNG, so a resumed run would draw other noise than a straight one
            generator=torch.Generator().manual_seed(0),
        )
        self._iter = iter(self._loader)

    def __iter__(self) -> CacheLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            batch = next(self._iter)
        except CacheFault as e:
            lines = str(e).strip().splitlines()
            if len(lines) > 1:  # re-raised from a worker with its traceback: keep the one-line message
                raise type(e)(lines[-1].partition(": ")[2]) from None
            raise
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes and close the tar descriptors (optional: process exit does both)."""
        self._iter = None
        self.dataset.rows.images.close()
