"""`pipeline demo`: the whole language-free story on the synthetic world, offline, in one command.

1. render the world (labelled images + an independent caption corpus);
2. train a small CLIP on its own stream of fresh synthetic pairs (`trainers clip`): a real CLIP is
   pretrained on pairs other than the generator's images, and none can be downloaded offline;
3. `pipeline run` with that CLIP: embed, retrieve, optimize (pseudo text features from images alone);
4. `trainers compare`: one generator per (condition, seed) at the same budget, trained on the LAFITE
   baseline (`perturb`) and on the pipeline's pseudo text features (`optimize`), each evaluated the same
   way, with a table, figures and a sample grid of real prompts. The generator is the LAFITE GAN unless
   `--generator ldm|dalle` picks another family (with its autoencoder, when it has one, trained first);
   each family's comparison has its own folder, so one demo folder holds all three.

Each step is the same core its own command runs; outputs land under `--out`, with the `pipeline.toml` of
step 3 (absolute paths), so `pipeline run` and `pipeline status` work in that folder. A rerun into the
same folder redoes only what changed: a world and a CLIP made with the same settings are kept (so nothing
downstream is restaged), a CLIP trained anew restages the captions its predecessor encoded, and the
compare keeps its committed runs. Each step ends with one plain line on stderr (its time and rate).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from trainers.families.registry import FAMILIES

GENERATORS = tuple(FAMILIES)  # the generator families (their records are light: no torch)

PRESETS = {
    # smoke: a minute, checks the wiring (the test suite runs it); cpu: 22.2 minutes measured on 2 cores of a
    # slow machine on the partial world (README); gpu: larger world, longer training
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
# --world: the synthetic world's caption style, and the CLIP recipe that goes with it (BENCHMARKS.md, "A
# world with a modality gap"): partial captions re-drawn every step at a fixed temperature keep the gap;
# full is the former world and recipe, kept to reproduce older numbers.
WORLDS = {
    "partial": dict(caption_style="partial"),  # trainers clip's defaults
    "full": dict(
        caption_style="full", temperature=None, temperature_start=None, contrast_group=3, steps=3000, lr=2e-3
    ),
}
DEMO_CONDITIONS = ("perturb", "optimize")  # the LAFITE baseline against the pipeline's features


@dataclass(frozen=True)
class DemoResult:
    world: Path
    cache: Path
    clip_eval: Path
    config: Path  # the pipeline.toml of step 3
    compare: object  # trainers.compare.config.CompareResult


N_STEPS = 4
WORLD_RECORD = "demo_world.json"  # in the world folder: the SynthConfig and files the demo rendered


def compare_dir(out: Path, generator: str) -> Path:
    """Where step 4 writes: `compare/` for the GAN (the default), `compare-{generator}/` for the others, so
    one demo folder holds every family's comparison against the one cache."""
    return out / ("compare" if generator == "gan" else f"compare-{generator}")


def run_demo(
    out: Path,
    preset: str = "cpu",
    workers: int = 2,
    device: str = "auto",
    generator: str = "gan",
    world_style: str = "partial",
) -> DemoResult:
    from core.processes import threads_note, threads_reason
    from core.progress import print_line, progress_bar
    from manifests import list_manifests
    from pipeline.run import RunConfig, run_pipeline, stage_configs
    from trainers.clip.config import ClipTrainConfig
    from trainers.clip.train import train_clip
    from trainers.compare.config import CompareConfig
    from trainers.compare.run import compare_progress, run_compare
    from world.synth import SynthConfig

    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}")
    if generator not in GENERATORS:
        raise ConfigError(f"--generator {generator}: choose one of {', '.join(GENERATORS)}")
    if world_style not in WORLDS:
        raise ConfigError(f"--world {world_style}: choose one of {', '.join(WORLDS)}")
    p = PRESETS[preset]
    clip_recipe = {**WORLDS[world_style], **p["clip"]}  # a preset's own steps and sizes win
    out = Path(out).resolve()  # pipeline.toml and the manifests then name the same files from anywhere
    world, cache, config_path = out / "world", out / "cache", out / "pipeline.toml"
    print_line(f"demo: {threads_reason()}")  # a busy machine is the first thing that makes it slow
    threads_note()  # said: the first bar need not say it again

    with demo_step(1, "synth") as step:
        synth_config = SynthConfig(
            out=world,
            n=p["n"],
            n_captions=p["n_captions"],
            image_size=p["image_size"],
            max_objects=p["max_objects"],
            caption_style=world_style,
        )
        synth, rendered = synth_world(synth_config)
        if rendered:
            step.what = (
                f"{synth.n_images:,} images in {len(synth.shards)} shard(s), {synth.n_captions:,} captions"
            )
            step.done, step.unit = synth.n_images, "img"
        else:
            step.what = f"kept {world} (rendered with the same settings)"

    with demo_step(2, "clip") as step:
        # resume: an interrupted demo continues its CLIP from the last RUN/train_state.pt
        clip_config = ClipTrainConfig(out=out / "clip", device=device, force=True, resume=True, **clip_recipe)
        clip_dir = Path(clip_config.out)
        retrained = not trained_clip(clip_config)
        if retrained:
            (clip_dir / "clip_eval.json").unlink(missing_ok=True)  # written last: marks a complete run
            with progress_bar("clip", total=clip_config.steps, unit="step") as advance:
                trained = train_clip(clip_config, advance)
            resumed = f" (resumed at step {trained.resumed_at:,})" if trained.resumed_at else ""
            step.what = f"{clip_config.steps:,} steps{resumed} -> {clip_dir}"
            step.done, step.unit = clip_config.steps - trained.resumed_at, "step"
        else:
            step.what = f"reused {clip_dir} (trained with the same settings)"
        step.what += "; " + clip_summary(clip_dir)

    with demo_step(3, "pipeline") as step:
        sections = {
            "embed": {
                "inputs": [str(s) for s in synth.shards],
                "clip_model": str(clip_dir / "clip_config.json"),
                "clip_pretrained": str(clip_dir / "clip.pt"),
                "image_size": p["image_size"],
                "batch_size": p["batch_size"],
                "workers": workers,
                "device": device,
            },
            "retrieve": {"captions": [str(synth.captions_parquet)], "device": device},
            "optimize": {"device": device},
        }
        write_pipeline_toml(config_path, cache, sections)
        # A new CLIP re-embeds every image, and the captions its predecessor encoded must be redone too
        # (`pipeline retrieve` refuses to mix two CLIPs without --force).
        force = ("retrieve",) if retrained and list_manifests(cache, "captions") else ()
        results = run_pipeline(
            stage_configs(sections, cache, force), RunConfig(cache, force=force), progress_bar
        )
        embedded, optimized = results["embed"].rows_written, results["optimize"].rows_written
        step.what = f"{embedded:,} images embedded, {optimized:,} pseudo text features -> {config_path}"
        step.done, step.unit = embedded, "img"

    with demo_step(4, "compare") as step:
        config = CompareConfig.from_preset(
            p["compare"],
            generator,
            cache=cache,
            out=compare_dir(out, generator),
            conditions=DEMO_CONDITIONS,
            seeds=p["seeds"],
            device=device,
        )
        with compare_progress() as progress:
            result = run_compare(config, progress)
        step.what = f"{len(result.ran)} run(s) made, {len(result.up_to_date)} up to date"
        step.done, step.unit = len(result.ran), "run"
    return DemoResult(world, cache, clip_dir / "clip_eval.json", config_path, result)


def clip_summary(clip_dir: Path) -> str:
    """'zero-shot shape 0.93, ...; modality gap: cos(image, own caption) 0.31, gap vector 0.74'."""
    from trainers.clip.train import describe_gap, read_eval

    evaluation = read_eval(clip_dir)
    zero_shot = ", ".join(f"{k} {v:.2f}" for k, v in (evaluation.get("zero_shot") or {}).items())
    return f"zero-shot {zero_shot or 'not measured'}{describe_gap(evaluation.get('modality_gap'))}"


@dataclass
class Step:
    """What a demo step reports when it ends: `what` it did, and `done` items of `unit` for its rate."""

    what: str = ""
    done: int = 0
    unit: str = ""


@contextmanager
def demo_step(index: int, name: str) -> Iterator[Step]:
    """Time one step; at its end print `demo 2/4 clip: WHAT in 0:04:31, 11 step/s` on stderr, so a log
    shows each step even where no bar is drawn."""
    from core.progress import format_clock, format_rate, print_line

    t0 = time.perf_counter()
    step = Step()
    yield step
    seconds = time.perf_counter() - t0
    rate = f", {format_rate(step.done / seconds, step.unit)}" if step.done and step.unit else ""
    print_line(f"demo {index}/{N_STEPS} {name}: {step.what} in {format_clock(seconds)}{rate}")


def synth_world(config) -> tuple[Any, bool]:
    """(SynthResult, rendered now?): the world already rendered there with the same settings, its files
    untouched since (sizes and mtimes as recorded), is kept, so nothing downstream sees a change."""
    from manifests import write_json_atomic
    from world.synth import SynthResult, run_synth

    record_path = Path(config.out) / WORLD_RECORD
    wanted = json.loads(json.dumps(asdict(config), default=str))
    try:
        record = json.loads(record_path.read_text())
        if record["config"] == wanted and record["files"] == _file_stats(record["files"]):
            result = record["result"]
            paths = {"shards": [Path(s) for s in result["shards"]]}
            paths.update({k: Path(result[k]) for k in ("captions_parquet", "captions_txt")})
            return SynthResult(**{**result, **paths, "held_out_pairs": SynthResult.held_out_pairs}), False
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record, or another world: render it
    record_path.unlink(missing_ok=True)
    result = run_synth(config)
    files = [str(p) for p in (*result.shards, result.captions_parquet, result.captions_txt)]
    record = {"config": wanted, "result": json.loads(json.dumps(asdict(result), default=str))}
    write_json_atomic(record_path, {**record, "files": _file_stats(files)})
    return result, True


def _file_stats(files) -> dict[str, list[int]]:
    import os

    stats = {}
    for path in files:
        st = os.stat(path)
        stats[path] = [st.st_size, st.st_mtime_ns]
    return stats


def trained_clip(config) -> bool:
    """Whether `config.out` holds a complete CLIP run (its eval, written last, is there) trained with
    `config` (where it ran aside): then the demo reuses it, and a rerun re-embeds nothing."""
    out = Path(config.out)
    if not all((out / name).is_file() for name in ("clip.pt", "clip_config.json", "clip_eval.json")):
        return False
    try:
        recorded = json.loads((out / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    from trainers.clip.config import learnt_of

    return isinstance(recorded, dict) and learnt_of(recorded) == config.learnt()


def write_pipeline_toml(path: Path, cache: Path, sections: dict[str, dict[str, Any]]) -> None:
    """The demo's pipeline.toml: what step 3 ran, with absolute paths (`pipeline.toml` paths are read
    from the working directory), so `pipeline run` there, or `--config PATH` from anywhere, sees it."""
    from manifests import write_bytes_atomic

    lines = [
        "# Written by `pipeline demo`: the pipeline it ran. `pipeline run` or `pipeline status` in this",
        "# folder (or with --config THIS_FILE from anywhere) use it; the demo rewrites it on each run.",
        f"cache = {_toml_value(str(cache))}",
    ]
    for name, values in sections.items():
        lines += ["", f"[{name}]", *(f"{key} = {_toml_value(value)}" for key, value in values.items())]
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_bytes_atomic(path, text.encode())


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, (int, float)) else json.dumps(value)  # a JSON string is TOML
