"""What an image autoencoder is to the families that work in it (ldm: the KL VAE's latents; dalle: the dVAE's
tokens) and to `trainers compare`, which trains one per comparison and shares it by every run. Each declares
its record in its folder (`autoencoder.py`)."""

from __future__ import annotations

from dataclasses import dataclass

# Config fields that say where a run writes and how it runs, not what it learns: `trainers compare` keys
# its runs on the others.
RUN_UNKEYED = ("cache", "out", "name", "device", "checkpoint_every", "log_every", "allow_partial")


@dataclass(frozen=True)
class Autoencoder:
    """The image autoencoder a family works in (ldm: the KL VAE's latents; dalle: the dVAE's tokens), which
    `trainers compare` trains once and shares by every run."""

    kind: str  # its checkpoints' kind, its command and its compare unit (and folder)
    title: str  # how messages name it
    field: str  # the family config's field that names its checkpoint
    config: str  # "module:Class" of its training config
    train: str  # "module:function": (config, progress) -> a result with `.checkpoint`, `.run_dir`, `.psnr`
    encode: str  # "module:function": (cache, checkpoint, *, batch_size, device) -> its per-shard cache
    sizes: str  # "module:NAME" of its size registry
    unkeyed: tuple[str, ...] = RUN_UNKEYED  # its config's fields `trainers compare` does not key
