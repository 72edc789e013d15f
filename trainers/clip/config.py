"""`trainers clip`'s config: its options and their defaults, checked, and the bundled open_clip config of
each --size. The trainer is trainers/clip/train.py.

Light on purpose, as trainers/families/gan/config.py: `trainers clip --help` reads its defaults from
`ClipTrainConfig`, so nothing here imports torch, numpy or open_clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, require_at_least
from world.synth import CAPTION_STYLES

# --size -> bundled open_clip config: rn32 (ModifiedResNet, 32 px) is the one that sees every attribute;
# tiny is for tests; small is a 64 px ViT
CLIP_SIZES = {"rn32": "lafite-rn32", "tiny": "lafite-tiny", "small": "lafite-small"}
# ClipTrainConfig fields that do not change what is learnt: a run resumes, and the demo reuses a CLIP,
# whatever they are
UNKEYED = ("out", "device", "force", "resume", "checkpoint_every")
TEMPERATURE_RAMP = 0.5  # the share of the steps --temperature-start anneals over


def learnt_of(recorded: dict) -> dict:
    """A recorded config's fields that decide what is learnt: all but UNKEYED, and no --temperature-start
    when it is unset (as runs made before the option recorded them)."""
    return {
        k: v for k, v in recorded.items() if k not in UNKEYED and not (k == "temperature_start" and v is None)
    }


def parse_temperature(text: str) -> float | None:
    """--temperature's value: `learnt` (None) or a number (checked by ClipTrainConfig.validate)."""
    if text.strip().lower() in ("learnt", "learned"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--temperature must be a number or `learnt`, got {text!r}") from None


@dataclass(frozen=True)
class ClipTrainConfig:
    data: tuple[str, ...] = ()  # image+caption inputs (tars, folders, Parquet); (): a fresh synthetic stream
    out: Path | None = None  # run dir (clip.pt, clip_config.json, clip_eval.json); None: runs/NNN-clip-SIZE
    size: str = "rn32"  # a CLIP_SIZES key (bundled open_clip configs)
    steps: int = 2800  # optimisation steps (BENCHMARKS.md, "A warmer start": shape is the last learnt)
    batch_size: int = 129  # pairs per step (the InfoNCE negatives), rounded down to whole contrast groups
    pretrain_n: int = 24000  # fresh synthetic pairs rendered for training when no --data is given
    contrast_group: int = 1  # scenes per group that differ only in shape (1: independent pairs)
    max_objects: int = 1  # objects per synthetic training image (1 or 2; see bench_clip in BENCHMARKS.md)
    caption_style: str = "partial"  # partial: captions name 1-4 attributes, re-drawn each step; full: all
    temperature: float | None = 0.02  # fixed InfoNCE temperature (keeps the gap); None: learnt from 0.07
    # with a fixed temperature: start here and anneal (geometrically) to it over the first half of the steps
    # (a warmer start learns shape sooner, and the gap stays: BENCHMARKS.md, "A warmer start"); None: fixed
    # from the first step
    temperature_start: float | None = 0.1
    lr: float = 1e-3  # AdamW peak learning rate (BENCHMARKS.md, "A CLIP with a modality gap")
    weight_decay: float = 0.1  # on matrices only
    warmup: int = 50  # linear warmup steps (clamped to steps // 2)
    seed: int = 0  # init, batch order, augmentation
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    eval_n: int = 600  # held-out synthetic images for zero-shot accuracy (0: skip)
    eval_seed: int = 0  # synth seed of the held-out images (indices >= 10^9 never collide with training)
    force: bool = False  # overwrite an existing RUN/clip.pt
    checkpoint_every: int = (
        250  # steps between saves of RUN/train_state.pt (0: none), which --resume continues
    )
    resume: bool = False  # continue from RUN/train_state.pt when it holds a run with these learnt settings

    def temperature_at(self, step: int) -> float | None:
        """The fixed temperature of `step`: from --temperature-start down to --temperature, geometrically,
        over the first half of the steps (TEMPERATURE_RAMP), then --temperature; None when learnt."""
        if self.temperature is None or self.temperature_start is None:
            return self.temperature
        ramp = max(1, int(TEMPERATURE_RAMP * self.steps))
        done = min(1.0, step / ramp)
        return self.temperature_start * (self.temperature / self.temperature_start) ** done

    def learnt(self) -> dict:
        """The fields that decide what is learnt (all but UNKEYED), as config.json records them."""
        import json
        from dataclasses import asdict

        return learnt_of(json.loads(json.dumps(asdict(self), default=str)))

    def validate(self) -> None:
        if self.size not in CLIP_SIZES:
            raise ConfigError(f"--size {self.size}: choose one of {', '.join(CLIP_SIZES)}")
        if self.max_objects not in (1, 2):
            raise ConfigError("--max-objects must be 1 or 2")
        if self.caption_style not in CAPTION_STYLES:
            raise ConfigError(f"--caption-style must be one of {', '.join(CAPTION_STYLES)}")
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and 0.01 <= self.temperature <= 10
        ):
            raise ConfigError("--temperature must be between 0.01 and 10, or `learnt`")
        if self.temperature_start is not None:
            if self.temperature is None:
                raise ConfigError("--temperature-start anneals a fixed --temperature; a learnt one has none")
            if not (math.isfinite(self.temperature_start) and 0.01 <= self.temperature_start <= 10):
                raise ConfigError("--temperature-start must be between 0.01 and 10")
        require_at_least(
            ("--pretrain-n", self.pretrain_n, 2),
            ("--contrast-group", self.contrast_group, 1),
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 2),
            ("--warmup", self.warmup, 0),
            ("--eval-n", self.eval_n, 0),
            ("--seed", self.seed, 0),
            ("--checkpoint-every", self.checkpoint_every, 0),
        )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("--lr must be a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError("--weight-decay must be 0 or more")
        if self.out is None:
            return
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")
        if (out / "clip.pt").exists() and not self.force:
            raise ConfigError(
                f"--out {out}: already holds clip.pt; pass --force to overwrite it or another --out"
            )
