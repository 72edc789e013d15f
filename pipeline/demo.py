"""`pipeline demo`: the whole language-free story on the synthetic world, offline, in one command.

1. render the world (labelled images + an independent caption corpus);
2. train a small CLIP on its own stream of fresh synthetic pairs (`trainers clip`): a real CLIP is
   pretrained on pairs other than the generator's images, and none can be downloaded offline;
3. `pipeline run` with that CLIP: embed, retrieve, optimize (pseudo text features from images alone);
4. `trainers compare`: one LAFITE GAN per (condition, seed) at the same budget, trained on the LAFITE
   baseline (`perturb`) and on the pipeline's pseudo text features (`optimize`), each evaluated the same
   way, with a table, figures and a sample grid of real prompts.

Each step is the same core its own command runs; outputs land under `--out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

PRESETS = {
    # smoke: a minute, checks the wiring (the test suite runs it); cpu: under 20 minutes on 2 cores (the
    # CLIP about 4.5, the compare about 10; BENCHMARKS.md); gpu: larger world, longer training
    "smoke": dict(
        n=96,
        n_captions=300,
        image_size=32,
        max_objects=1,
        clip=dict(size="tiny", steps=10, batch_size=33, pretrain_n=99, eval_n=32),
        compare="smoke",
        seeds=(0,),
        batch_size=32,
    ),
    "cpu": dict(
        n=2000,
        n_captions=5000,
        image_size=32,
        max_objects=1,  # as the CLIP's pretraining stream: the recipe that reads every attribute (>= 0.9)
        clip=dict(size="rn32"),
        compare="cpu",
        seeds=(0, 1),
        batch_size=256,
    ),
    "gpu": dict(
        n=20000,
        n_captions=100000,
        image_size=32,
        max_objects=2,
        clip=dict(size="rn32", max_objects=2, steps=20000, batch_size=510, pretrain_n=400_000),
        compare="gpu",
        seeds=(0, 1, 2),
        batch_size=1024,
    ),
}
DEMO_CONDITIONS = ("perturb", "optimize")  # the LAFITE baseline against the pipeline's features
DEMO_PROMPTS = (
    "a small red circle on the left",
    "a large blue square at the top",
    "one tiny green triangle in the centre",
    "a big yellow star on the right",
    "a purple diamond at the bottom",
    "a red triangle in the centre",  # a colour/shape pair no training image has
)


@dataclass(frozen=True)
class DemoResult:
    world: Path
    cache: Path
    clip_eval: Path
    compare: object  # trainers.compare.CompareResult


def run_demo(out: Path, preset: str = "cpu", workers: int = 2, device: str = "auto") -> DemoResult:
    from pipeline.embed import EmbedConfig
    from pipeline.optimize import OptimizeConfig
    from pipeline.progress import progress_bar
    from pipeline.retrieve import RetrieveConfig
    from pipeline.run import RunConfig, StageConfigs, run_pipeline
    from pipeline.synth import SynthConfig, run_synth
    from trainers.clip_train import ClipTrainConfig, train_clip
    from trainers.compare import CompareConfig, compare_progress, run_compare

    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    world, cache = out / "world", out / "cache"
    synth = run_synth(
        SynthConfig(
            out=world,
            n=p["n"],
            n_captions=p["n_captions"],
            image_size=p["image_size"],
            max_objects=p["max_objects"],
        )
    )
    shards = tuple(str(s) for s in synth.shards)

    clip_config = ClipTrainConfig(out=out / "clip", device=device, force=True, **p["clip"])
    with progress_bar("clip", total=clip_config.steps, unit="step") as advance:
        clip = train_clip(clip_config, advance)
    configs = StageConfigs(
        embed=EmbedConfig(
            inputs=shards,
            cache=cache,
            clip_model=str(clip.model_config),
            clip_pretrained=str(clip.checkpoint),
            image_size=p["image_size"],
            batch_size=p["batch_size"],
            workers=workers,
            device=device,
        ),
        retrieve=RetrieveConfig.from_options(
            captions=(str(synth.captions_parquet),), cache=cache, device=device
        ),
        optimize=OptimizeConfig(cache=cache, device=device),
    )
    run_pipeline(configs, RunConfig(cache=cache))

    config = CompareConfig.from_preset(
        p["compare"],
        "gan",
        cache=cache,
        out=out / "compare",
        conditions=DEMO_CONDITIONS,
        seeds=p["seeds"],
        device=device,
    )
    with compare_progress() as progress:
        result = run_compare(config, progress)
    return DemoResult(world, cache, clip.eval_path, result)
