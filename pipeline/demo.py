"""`pipeline demo`: the whole language-free story on the synthetic world, offline, in one command.

1. render the world (labelled images + an independent caption corpus);
2. train a small CLIP on its image-caption pairs (`trainers clip`): no pretrained CLIP offline;
3. `pipeline run` with that CLIP: embed, retrieve, optimize (pseudo text features from images alone);
4. train a small LAFITE GAN on the pseudo text features (`trainers gan`);
5. sample a grid for real prompts and evaluate (`trainers sample`, `trainers eval`).

Each step is the same core its own command runs; outputs land under `--out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

PRESETS = {
    # smoke: a minute, checks the wiring (the test suite runs it); cpu: about 7 minutes on 2 cores;
    # gpu: larger world, 64 px, longer training
    "smoke": dict(
        n=96,
        n_captions=300,
        image_size=32,
        clip_size="tiny",
        clip_steps=10,
        gan_size="tiny",
        gan_steps=4,
        gan_batch=8,
        eval_n=32,
        batch_size=32,
    ),
    "cpu": dict(
        n=2000,
        n_captions=5000,
        image_size=32,
        clip_size="tiny",
        clip_steps=300,
        gan_size="tiny",
        gan_steps=1500,
        gan_batch=32,
        eval_n=500,
        batch_size=256,
    ),
    "gpu": dict(
        n=20000,
        n_captions=100000,
        image_size=64,
        clip_size="small",
        clip_steps=3000,
        gan_size="small",
        gan_steps=20000,
        gan_batch=64,
        eval_n=5000,
        batch_size=1024,
    ),
}
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
    gan_run: Path
    grid: Path
    eval_json: Path
    eval: dict


def run_demo(out: Path, preset: str = "cpu", workers: int = 2, device: str = "auto") -> DemoResult:
    from pipeline.embed import EmbedConfig
    from pipeline.optimize import OptimizeConfig
    from pipeline.retrieve import RetrieveConfig
    from pipeline.run import RunConfig, StageConfigs, run_pipeline
    from pipeline.synth import SynthConfig, run_synth
    from trainers.clip_train import ClipTrainConfig, train_clip
    from trainers.evaluate import EvalConfig, evaluate
    from trainers.sample import SampleConfig, load_generator, run_sample
    from trainers.train_gan import GanConfig, run_gan

    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    world, cache = out / "world", out / "cache"
    synth = run_synth(
        SynthConfig(out=world, n=p["n"], n_captions=p["n_captions"], image_size=p["image_size"])
    )
    shards = tuple(str(s) for s in synth.shards)

    clip = train_clip(
        ClipTrainConfig(
            data=shards,
            out=out / "clip",
            size=p["clip_size"],
            steps=p["clip_steps"],
            device=device,
            force=True,
        )
    )
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

    gan = run_gan(
        GanConfig(
            cache=cache,
            out=out / "runs",
            name="gan-demo",
            size=p["gan_size"],
            steps=p["gan_steps"],
            batch_size=p["gan_batch"],
            device=device,
            sample_every=max(p["gan_steps"] // 3, 1),
            checkpoint_every=0,
        )
    )
    sample = run_sample(
        SampleConfig(
            checkpoint=gan.checkpoint, prompts=DEMO_PROMPTS, out=out / "samples.png", n=6, device=device
        )
    )
    generate, info = load_generator(gan.checkpoint, device=device)
    evaluation = evaluate(
        EvalConfig(
            checkpoint=str(gan.checkpoint), cache=cache, out=out / "eval", n=p["eval_n"], device=device
        ),
        generate,
        info,
    )
    return DemoResult(
        world, cache, clip.eval_path, gan.run_dir, sample.grid, out / "eval" / "eval.json", evaluation
    )
