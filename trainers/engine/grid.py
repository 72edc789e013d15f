"""Sample grids: one row of images per prompt, its text at the left (PIL's default font, wrapped), written as
a PNG; the training loop writes them every `sample_every` steps, and `trainers sample` and `trainers
compare` write theirs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from manifests import write_bytes_atomic

LABEL_WIDTH = 200  # pixels of prompt text at the left of each grid row
LABEL_MARGIN = 4


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


def write_grid(path: Path, images: Any, prompts: list[str], n: int) -> Path:
    """Write the labelled grid PNG atomically."""
    write_bytes_atomic(Path(path), png_bytes(render_grid(images, prompts, n)))
    return Path(path)


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
