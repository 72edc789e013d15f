"""`trainers sample`: prompts -> CLIP text features -> images from a checkpoint's EMA generator.

`load_generator(ckpt)` (trainers/families/load.py) is the contract `trainers eval` uses too:

    generate, info = load_generator(Path("runs/000-gan/0020000.pt"))
    images = generate(cond, seed=0)  # cond float32 [N, D] -> uint8 [N, 3, H, W]; same seed, same pixels
    info["clip_model"], info["clip_pretrained"]  # the CLIP the run's cache was made with (for prompts)

The grid PNG (trainers/engine/grid.py) has one row per prompt, its text at the left, and the N images in a
row; the same images are written one file each into a folder named after the PNG
(`out/grid.png` -> `out/grid/{row:03d}-{col:03d}.png`).

`--rerank K` (DALL-E's CLIP re-ranking, `trainers.eval.rerank`): each cell is the best of K candidates by the
cosine between its CLIP image feature and its prompt's text feature, with the checkpoint's CLIP; the
cell's candidate 0 is the image it shows without re-ranking (K = 1, the default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from manifests import write_bytes_atomic
from trainers.engine.grid import png_bytes, write_grid
from trainers.families.load import load_generator


@dataclass(frozen=True)
class SampleConfig:
    checkpoint: Path  # a `trainers gan` or `trainers ldm` checkpoint, or a run directory (its latest)
    prompts: tuple[str, ...]  # one grid row each
    out: Path = Path("samples.png")  # the grid; single images go into a folder named after it
    n: int = 4  # images per prompt
    seed: int = 0  # same checkpoint, prompts and seed: same pixels
    device: str = "auto"
    steps: int | None = None  # LDM sampler steps (None: 50)
    guidance: float | None = None  # LDM classifier-free guidance scale (None: the run's)
    rerank: int = 1  # candidates per cell, the best by CLIP score kept (trainers.eval.rerank); 1: off

    def validate(self) -> None:
        if not self.prompts:
            raise ConfigError("give at least one --prompt TEXT or a --prompts FILE with one prompt per line")
        if self.n < 1:
            raise ConfigError("--n must be at least 1")
        if self.rerank < 1:
            raise ConfigError("--rerank must be at least 1 (1: no re-ranking)")
        if self.out.suffix.lower() != ".png":
            raise ConfigError(f"--out {self.out}: the grid is a PNG; give a path ending in .png")


@dataclass
class SampleResult:
    grid: Path
    images: list[Path]
    step: int  # the checkpoint's training step
    resolution: int
    reranked: Any = None  # trainers.eval.rerank.Reranked of the cells (prompt-major) when --rerank > 1


def run_sample(config: SampleConfig) -> SampleResult:
    from PIL import Image

    from core.clip import encode_texts, load_clip
    from trainers.eval.rerank import rerank

    config.validate()
    generate, info = load_generator(
        config.checkpoint, device=config.device, steps=config.steps, guidance=config.guidance
    )
    clip = load_clip(info["clip_model"], info["clip_pretrained"] or None, config.device)
    if clip.dim != info["h_dim"]:
        raise ConfigError(
            f"--checkpoint {config.checkpoint}: its CLIP ({info['clip_model']}) is {clip.dim}-d, "
            f"the generator takes {info['h_dim']}-d features"
        )
    prompts = list(config.prompts)
    cond = encode_texts(clip, prompts).cpu().clone()  # [P, D]
    # rerank 1 is exactly generate(cells, seed); K > 1 keeps each cell's best of K by CLIP score
    cells = cond.repeat_interleave(config.n, dim=0)  # [P * n, D]
    reranked = rerank(generate, cells, clip, config.rerank, config.seed)
    images = reranked.images  # [P * n, 3, R, R] uint8
    grid = write_grid(config.out, images, prompts, config.n)
    folder = config.out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    singles = []
    pixels = images.permute(0, 2, 3, 1).numpy()  # [P * n, R, R, 3]
    for i, array in enumerate(pixels):
        path = folder / f"{i // config.n:03d}-{i % config.n:03d}.png"
        write_bytes_atomic(path, png_bytes(Image.fromarray(array)))
        singles.append(path)
    kept = reranked if config.rerank > 1 else None
    return SampleResult(grid, singles, info["step"], info["resolution"], kept)
