"""`trainers probe`'s config: its options and their defaults, checked, and what of them keys a cached
probe. The probe is trainers/probe/probe.py.

Light on purpose, as trainers/families/gan/config.py: `trainers probe --help` reads its defaults from
`ProbeConfig`, so nothing here imports torch or numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from core.errors import ConfigError, require_at_least

PROBE_VERSION = "1"  # in each probe file and its cache key: files of another version are refused


@dataclass(frozen=True)
class ProbeConfig:
    image_size: int = 32  # pixels per side (the cache's stored size)
    n_train: int = 6000  # rendered training images
    epochs: int = 6  # passes over their occupied slots (and as many empty ones)
    batch_size: int = 256  # slot crops per step
    lr: float = 5e-3  # AdamW peak, one-cycle cosine
    width: int = 16  # channels of the first conv stage (x2 in the second)
    max_objects: int = 2  # objects per training image (1 or 2)
    seed: int = 0  # training images, init and order
    n_eval: int = 1000  # held-out images for the recorded accuracy
    device: str = "auto"

    def validate(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ConfigError("--image-size must be between 16 and 1024")
        require_at_least(
            ("--n-train", self.n_train, 16),
            ("--epochs", self.epochs, 1),
            ("--batch-size", self.batch_size, 2),
            ("--width", self.width, 4),
            ("--n-eval", self.n_eval, 0),
            ("--seed", self.seed, 0),
        )
        if self.max_objects not in (1, 2):
            raise ConfigError("--max-objects must be 1 or 2")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("--lr must be a positive number")

    def keyed(self) -> dict[str, Any]:
        """What changes the probe (not the device)."""
        values = asdict(self)
        values.pop("device")
        return {"version": PROBE_VERSION, **values}
