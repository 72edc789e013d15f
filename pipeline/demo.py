"""`pipeline demo`: the whole story on the synthetic world, offline, in one command.

Today it renders the world and runs the pipeline stages that exist on it with the bundled tiny CLIP
(random weights until `trainers clip` can train one); each step is the same core the CLI runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRESETS = {
    # images, captions, stored px, CLIP config, batch size
    "cpu": dict(n=1000, n_captions=5000, image_size=64, clip_model="lafite-tiny", batch_size=128),
    "gpu": dict(n=20000, n_captions=100000, image_size=64, clip_model="lafite-small", batch_size=1024),
}


@dataclass(frozen=True)
class DemoResult:
    world: Path
    cache: Path
    images: int


def run_demo(out: Path, preset: str = "cpu", workers: int = 2, progress=None) -> DemoResult:
    from pipeline.embed import EmbedConfig, run_embed
    from pipeline.errors import ConfigError
    from pipeline.synth import SynthConfig, run_synth

    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    world, cache = Path(out) / "world", Path(out) / "cache"
    synth = run_synth(
        SynthConfig(out=world, n=p["n"], n_captions=p["n_captions"], image_size=p["image_size"])
    )
    embedded = run_embed(
        EmbedConfig(
            inputs=tuple(str(s) for s in synth.shards),
            cache=cache,
            clip_model=p["clip_model"],
            clip_pretrained="",
            image_size=p["image_size"],
            batch_size=p["batch_size"],
            workers=workers,
        ),
        progress,
    )
    return DemoResult(world=world, cache=cache, images=embedded.images_written)
