"""Any family's checkpoint as a generator: what `trainers sample`, `trainers eval` and `trainers compare` draw
with, through the family registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainers.engine.family import Generate


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
    None in older checkpoints). Any family in trainers.families.registry works; `steps` (sampler steps,
    default 50), `guidance` (default: the run's) and other sampler `options` (dalle: temperature, top_k,
    top_p)
    apply to the families whose `sampler` names them; None is not given."""
    import functools

    from core.lazy import member
    from trainers.families.registry import FAMILIES
    from trainers.runtime.checkpoints import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(ckpt_path, "--checkpoint")
    ckpt = load_checkpoint(path, "--checkpoint", kinds=tuple(FAMILIES))
    family = FAMILIES[ckpt["kind"]]
    generate, info = member(family.load)(path, ckpt, device=device)
    given = {"steps": steps, "guidance": guidance, **options}
    sampler = {k: v for k, v in given.items() if v is not None and k in family.sampler}
    return (functools.partial(generate, **sampler) if sampler else generate), info
