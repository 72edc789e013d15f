"""`trainers sample`: prompts -> CLIP text features -> images from a checkpoint's EMA generator.

`load_generator(ckpt)` is also the contract `trainers eval` uses:

    generate, info = load_generator(Path("runs/000-gan/0020000.pt"))
    images = generate(cond, seed=0)  # cond float32 [N, D] -> uint8 [N, 3, H, W]; same seed, same pixels
    info["clip_model"], info["clip_pretrained"]  # the CLIP the run's cache was made with (for prompts)

The grid PNG has one row per prompt, its text at the left (PIL's default font, wrapped), and the N
images in a row; the same images are written one file each into a folder named after the PNG
(`out/grid.png` -> `out/grid/{row:03d}-{col:03d}.png`).

`--rerank K` (DALL-E's CLIP re-ranking, `trainers.rerank`): each cell is the best of K candidates by the
cosine between its CLIP image feature and its prompt's text feature, with the checkpoint's CLIP; the
cell's candidate 0 is the image it shows without re-ranking (K = 1, the default).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests import write_bytes_atomic
from pipeline.errors import ConfigError
from pipeline.paths import resolve_recorded

LABEL_WIDTH = 200  # pixels of prompt text at the left of each grid row
LABEL_MARGIN = 4

Generate = Callable[..., Any]  # (cond: Tensor [N, D] float32, seed: int) -> uint8 Tensor [N, 3, H, W]


def load_generator(
    ckpt_path: Path | str,
    *,
    device: str = "auto",
    steps: int | None = None,
    guidance: float | None = None,
    **options: Any,
) -> tuple[Generate, dict[str, Any]]:
    """The checkpoint's EMA generator (eval mode) as `generate(cond, seed)`, and what it was trained with:
    kind, step, config, clip_model, clip_pretrained, resolution, h_dim, size, data (the rows trained on;
    None in older checkpoints). Any family in trainers.generators works; `steps` (sampler steps, default
    50), `guidance` (default: the run's) and other sampler `options` (dalle: temperature, top_k, top_p)
    apply to the families whose `sampler` names them; None is not given."""
    import functools

    from trainers.checkpoints import load_checkpoint, resolve_checkpoint
    from trainers.generators import FAMILIES, member

    path = resolve_checkpoint(ckpt_path, "--checkpoint")
    ckpt = load_checkpoint(path, "--checkpoint", kinds=tuple(FAMILIES))
    family = FAMILIES[ckpt["kind"]]
    generate, info = member(family.load)(path, ckpt, device=device)
    given = {"steps": steps, "guidance": guidance, **options}
    sampler = {k: v for k, v in given.items() if v is not None and k in family.sampler}
    return (functools.partial(generate, **sampler) if sampler else generate), info


def load_gan(path: Path, ckpt: dict[str, Any], *, device: str = "auto") -> tuple[Generate, dict[str, Any]]:
    """A loaded `trainers gan` checkpoint as `generate(cond [N, D], seed) -> uint8 [N, 3, R, R]` (its EMA
    generator) and its info (see `load_generator`)."""
    import torch

    from trainers.gan import build_models
    from trainers.runs import select_device

    if "G_ema" not in ckpt:
        raise ConfigError(f"--checkpoint {path}: not a `trainers gan` checkpoint (no G_ema)")
    arch = ckpt["arch"]
    G, _ = build_models(arch)
    G.load_state_dict(ckpt["G_ema"])
    G = G.to(select_device(device)).eval().requires_grad_(False)

    def generate(cond: torch.Tensor, seed: int) -> torch.Tensor:
        cond = torch.as_tensor(cond, dtype=torch.float32)
        if cond.dim() != 2 or cond.shape[1] != arch["h_dim"]:
            raise ValueError(
                f"cond must be [N, {arch['h_dim']}] (the run's CLIP dim), got {tuple(cond.shape)}"
            )
        return G.sample(cond, seed)  # [N, 3, R, R] uint8 on the CPU

    info = {
        "kind": "gan",
        "step": int(ckpt["step"]),
        "config": ckpt["config"],
        # older runs recorded the cache's CLIP files relative to where they ran: find them from here
        "clip_model": resolve_recorded(ckpt["clip"]["model"], path),
        "clip_pretrained": resolve_recorded(ckpt["clip"]["pretrained"], path),
        "resolution": arch["resolution"],
        "h_dim": arch["h_dim"],
        "size": arch["size"],
        "checkpoint": str(path),
        "data": ckpt.get("data"),  # the rows it was trained on (trainers.data.LoaderInfo.record)
    }
    return generate, info


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than a line gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def render_grid(images: Any, prompts: list[str], n: int):
    """uint8 [P * n, 3, R, R] (prompt-major) -> PIL image of (LABEL_WIDTH + n * R) x (P * R) pixels."""
    from PIL import Image, ImageDraw, ImageFont

    count, _, res, _ = images.shape
    if count != len(prompts) * n:
        raise ValueError(f"{count} images for {len(prompts)} prompts x {n}")
    grid = Image.new("RGB", (LABEL_WIDTH + n * res, len(prompts) * res), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    pixels = images.permute(0, 2, 3, 1).numpy()  # [P * n, R, R, 3]
    for row, prompt in enumerate(prompts):
        top = row * res
        lines = _wrap(prompt, font, LABEL_WIDTH - 2 * LABEL_MARGIN)
        max_lines = max(1, (res - 2 * LABEL_MARGIN) // line_height)
        if len(lines) > max_lines:  # a short row: keep what fits, mark the cut
            lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " ..."]
        for i, line in enumerate(lines):
            draw.text((LABEL_MARGIN, top + LABEL_MARGIN + i * line_height), line, fill="black", font=font)
        for col in range(n):
            grid.paste(Image.fromarray(pixels[row * n + col]), (LABEL_WIDTH + col * res, top))
    return grid


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_grid(path: Path, images: Any, prompts: list[str], n: int) -> Path:
    """Write the labelled grid PNG atomically."""
    write_bytes_atomic(Path(path), _png_bytes(render_grid(images, prompts, n)))
    return Path(path)


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
    rerank: int = 1  # candidates per cell, the best by CLIP score kept (trainers.rerank); 1: off

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
    reranked: Any = None  # trainers.rerank.Reranked of the cells (prompt-major) when --rerank > 1


def run_sample(config: SampleConfig) -> SampleResult:
    from PIL import Image

    from pipeline.clip import encode_texts, load_clip
    from trainers.rerank import rerank

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
        write_bytes_atomic(path, _png_bytes(Image.fromarray(array)))
        singles.append(path)
    kept = reranked if config.rerank > 1 else None
    return SampleResult(grid, singles, info["step"], info["resolution"], kept)
