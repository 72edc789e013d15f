"""Adding a generator family is its folder (with its `family.py` record) and one line in
trainers/families/registry.py: a toy family, registered with that one line, is trained, loaded, sampled,
evaluated, compared and rerun by `trainers compare` with no other change.

The toy "generates" by retrieval: it remembers the images and conditions of a few training batches, and
for a condition draws the remembered image whose condition is nearest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from factories import tiny_cache

from trainers.engine.family import Family
from trainers.families.registry import FAMILIES
from trainers.runtime.runs import RunConfig

NEAREST_SIZES = {"tiny": SimpleNamespace(lr=None)}  # one size: nothing to learn


@dataclass(frozen=True)
class NearestConfig(RunConfig):
    cache: Path = Path("cache")
    out: Path | None = None
    name: str = "nearest"
    size: str = "tiny"
    steps: int = 2  # training batches it remembers
    batch_size: int = 8
    seed: int = 0
    lr: float | None = None
    condition: str = "optimize"
    workers: int = 0
    device: str = "auto"
    checkpoint_every: int = 0
    sample_every: int = 0
    allow_partial: bool = False

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be at least 1")


def train_nearest(config: NearestConfig, progress: Any = None) -> SimpleNamespace:
    """As every family's: through the shared launch (validation, the torchrun world, what a Ctrl-C says)."""
    from trainers.engine import loop

    return loop.launch(config, lambda world, device, progress: _remember(config, progress), progress)


def _remember(config: NearestConfig, progress: Any) -> SimpleNamespace:
    import torch

    from feature_cache.embed_rows import cache_clip
    from trainers.data.loader import cache_loader_config, make_loader
    from trainers.runtime.checkpoints import save_checkpoint

    loader = make_loader(cache_loader_config(config))
    images, conds = [], []
    for _, batch in zip(range(config.steps), loader, strict=False):
        images.append(((batch["image"].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        conds.append(batch["cond"].float())
        if progress is not None:
            progress(1)
    clip = cache_clip(config.cache)
    state = {
        "kind": "nearest",
        "images": torch.cat(images),
        "conds": torch.cat(conds),
        "config": config.to_dict(),
        "clip": {"model": clip.clip_model, "pretrained": clip.clip_pretrained, "dim": clip.dim},
        "data": loader.info.record(),
    }
    checkpoint = save_checkpoint(Path(config.out), config.steps, state)
    return SimpleNamespace(checkpoint=checkpoint, run_dir=Path(config.out))


def load_nearest(path: Path, ckpt: dict[str, Any], *, device: str = "auto"):
    import torch

    images, conds = ckpt["images"], ckpt["conds"]

    def generate(cond, seed: int):
        cond = torch.as_tensor(cond, dtype=torch.float32)
        return images[(cond @ conds.T).argmax(dim=1)]  # [N, 3, R, R] uint8: the nearest remembered image

    info = {
        "kind": "nearest",
        "step": int(ckpt["step"]),
        "config": ckpt["config"],
        "clip_model": ckpt["clip"]["model"],
        "clip_pretrained": ckpt["clip"]["pretrained"],
        "resolution": int(images.shape[-1]),
        "h_dim": int(conds.shape[1]),
        "size": "tiny",
        "checkpoint": str(path),
        "data": ckpt["data"],
    }
    return generate, info


NEAREST = Family(
    "nearest",
    f"{__name__}:NearestConfig",
    f"{__name__}:train_nearest",
    f"{__name__}:load_nearest",
    f"{__name__}:NEAREST_SIZES",
    presets={"smoke": dict(size="tiny", steps=2, batch_size=8, eval_n=16)},
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tiny_cache(tmp_path_factory.mktemp("toy-family-cache"))


def test_a_registered_toy_family_is_trained_evaluated_and_compared(cache, tmp_path, monkeypatch):
    from core.errors import ConfigError
    from trainers.compare.config import CompareConfig
    from trainers.compare.run import run_compare

    def smoke():
        values = dict(cache=cache, out=tmp_path / "compare", conditions=("perturb", "caption"), seeds=(0,))
        return CompareConfig.from_preset("smoke", generator="nearest", device="cpu", **values)

    with pytest.raises(ConfigError, match="--generator nearest: choose one of"):
        smoke()  # not registered yet
    monkeypatch.setitem(FAMILIES, "nearest", NEAREST)  # the one registry line

    result = run_compare(smoke())
    assert result.ran == ["perturb-s0", "caption-s0"]
    for name in result.ran:
        evaluation = json.loads((tmp_path / "compare" / "runs" / name / "eval" / "eval.json").read_text())
        assert evaluation["n"] == 16 and set(evaluation["attribute_accuracy"]) >= {"colour", "shape"}
    assert (tmp_path / "compare" / "report.md").is_file()
    assert run_compare(smoke()).ran == []  # committed: a rerun does nothing
