"""Data-parallel training under `torchrun`: one process per device, the global batch split between them.

    torchrun --nproc_per_node 4 -m trainers gan --cache cache --batch-size 256 ...

`--batch-size` is the global batch. Every rank walks the same seeded sample stream (trainers/data/loader.py)
and loads only its contiguous slice of each global batch, so the stream, and what a step sees, do not depend
on the world size. Every random draw of a step (noise, timesteps, crops, condition and --dropout masks)
is drawn at the global batch's shape from the same seeded RNG on every rank, and each rank keeps its slice
(`World.part`), so one process and N processes draw the same numbers. Gradients are averaged over the
ranks (one coalesced all-reduce per optimiser step, `World.average_gradients`); a loss that couples the
rows of a batch (the GAN's InfoNCE) is computed on the gathered global batch (`World.gather`). So after
the same steps the parameters match a one-process run to float tolerance, and the EMA, updated from them
on every rank, matches too. The losses logged are the global batch's too: at log steps every rank's are
averaged (`World.mean_scalars`, one all-reduce), so metrics.jsonl reads as a one-process run's. Only rank
0 writes: checkpoints, config.json, metrics, sample grids and the progress bar. A checkpoint holds rank
0's RNG states, which every rank shares, so a run resumes with any world size.

NCCL on CUDA (rank r uses cuda:LOCAL_RANK), gloo on the CPU. Without torchrun's environment a trainer
runs as one process, unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import ConfigError

LAUNCH_HINT = "launch with `torchrun --nproc_per_node N -m trainers ...` (or without torchrun: one process)"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def local_batch(self, batch_size: int, flag: str = "--batch-size") -> int:
        """This rank's share of the global batch; a global batch the world size does not divide is refused."""
        if batch_size % self.size:
            raise ConfigError(
                f"{flag} {batch_size} is the global batch and must be a multiple of the {self.size} "
                f"processes (each takes an equal slice); use {flag} "
                f"{batch_size - batch_size % self.size or self.size}"
            )
        return batch_size // self.size

    def part(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a tensor drawn at the global batch's shape [B, ...]."""
        if not self.distributed:
            return x
        b = x.shape[0] // self.size
        return x[self.rank * b : (self.rank + 1) * b]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[b, ...] on every rank -> the global [B, ...] in rank order; gradients flow to this rank's rows
        only (the other ranks' rows are their values), so a loss of the whole batch, backpropagated on
        every rank and averaged, gives the one-process gradient when scaled by `size` (`coupled`)."""
        if not self.distributed:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[self.rank] = x
        return torch.cat(parts)

    def coupled(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss computed on `gather`ed rows: scaled so that averaging gradients over ranks sums them."""
        return loss * self.size if self.distributed else loss

    def average_gradients(self, parameters) -> None:
        """Replace every gradient by its mean over the ranks: the dense ones with one flattened all-reduce
        per dtype/device, a sparse one (an embedding's, for SparseAdam) over the union of the ranks' rows
        (`_average_sparse`)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        params = [p for p in parameters if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                p.grad = self._average_sparse(p.grad)
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for g in (p.grad for p in params if not p.grad.is_sparse):
            buckets.setdefault((g.dtype, g.device), []).append(g)
        for bucket in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= self.size
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def _average_sparse(self, grad: torch.Tensor) -> torch.Tensor:
        """A sparse row gradient averaged over the ranks, on the union of their rows: the rows one process's
        gradient of the global batch has, so a sparse optimiser updates the same rows."""
        import torch.distributed as dist

        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()  # [r], [r, W]
        present = torch.zeros(grad.shape[0], dtype=torch.int32, device=grad.device)
        present[rows] = 1
        dist.all_reduce(present)
        union = present.nonzero().squeeze(1)  # [U], sorted
        summed = values.new_zeros((len(union), *values.shape[1:]))  # [U, W]
        summed[torch.searchsorted(union, rows)] = values
        dist.all_reduce(summed)
        return torch.sparse_coo_tensor(
            union[None], summed / self.size, grad.shape, check_invariants=False, is_coalesced=True
        )

    def mean_scalars(self, values: dict[str, Any]) -> dict[str, float]:
        """Scalars (0-d tensors or numbers, the same keys on every rank) as floats averaged over the ranks,
        in one float64 all-reduce: a mean over a batch's rows, which each rank holds for its equal slice,
        becomes the global batch's, and a value every rank shares stays itself. The logged losses, at log
        steps only (each value costs a host sync). One process: the floats as they are."""
        floats = {k: float(v) for k, v in values.items()}
        if not self.distributed:
            return floats
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flat = torch.tensor(list(floats.values()), dtype=torch.float64, device=device)  # [k]
        dist.all_reduce(flat)
        return dict(zip(floats, (flat / self.size).tolist(), strict=True))

    def broadcast(self, modules) -> None:
        """Rank 0's parameters and buffers on every rank (they start equal by seeding; this makes it so)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, 0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


SINGLE = World()


def launched_world() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); one process without
    it. An incomplete environment is a one-line error."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    given = {n: os.environ.get(n) for n in names}
    if not any(given.values()):
        return SINGLE
    missing = [n for n, v in given.items() if v is None]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} not set while {', '.join(n for n in names if n not in missing)} "
            f"is: {LAUNCH_HINT}"
        )
    try:
        rank, size, local = (int(given[n]) for n in names)
    except ValueError:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {LAUNCH_HINT}") from None
    if not 0 <= rank < size:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {size}: {LAUNCH_HINT}")
    return World(rank, size, local)


def init_world(device: str = "auto") -> tuple[World, str]:
    """Join the process group torchrun launched (NCCL on CUDA, gloo on the CPU) and pick this rank's
    device: (world, device string). One process: (SINGLE, `device` unchanged)."""
    world = launched_world()
    if not world.distributed:
        return world, device
    import datetime

    import torch.distributed as dist

    from core.processes import die_with_parent

    die_with_parent(os.getppid())  # a SIGKILLed torchrun takes its ranks with it, not leaves them waiting

    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device here")
    if cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {world.local_rank}: only {torch.cuda.device_count()} CUDA device(s) on this "
                "node; use --nproc_per_node at most that"
            )
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("LAFITE_DIST_TIMEOUT_S", 600)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return world, device


def close_world(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def training_bar(description: str, total: int | None, unit: str = "step"):
    """The command's progress bar on rank 0; nothing on the other ranks of a torchrun job."""
    from core.progress import null_progress, progress_bar

    bar = progress_bar if launched_world().main else null_progress
    return bar(description, total=total, unit=unit)
