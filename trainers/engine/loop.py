"""The skeleton every training command shares (`trainers gan`, `ldm`, `dalle`, `dvae` and `vae`); each trainer
file keeps its model's step (`Trainer.train_step`) and what its run records, and its config lives in a
torch-free `config.py` in its folder (their shared option checks: trainers/engine/run_options.py; the cache
loader's config from theirs: trainers.data.loader.cache_loader_config).

    compiled(forward, backend)            the training forward under torch.compile (--compile), or itself
    launch(config, train)                 validate, join the torchrun world (or none), train, leave it
    load_resume(config, kind, state)      the --resume checkpoint, read once
    restore(trainer, resume, init, ...)   a resumed run's state, step and RNG, or --init's weights
    open_run(config, resume, pairs)       rank 0's run directory, new or the resumed one
    write_config / checkpoint_record      config.json, and what a checkpoint holds besides the state
    train_steps(trainer, batches, ...)    the step loop

The step loop, on every rank: `train_step` on this rank's slice of the global batch; at log steps (every
`log_every` and the last) the losses averaged over the ranks (`World.mean_scalars`, one all-reduce) and,
on rank 0, written to metrics.jsonl (`trainers.runtime.runs.log_metrics`); on rank 0 a checkpoint every
`checkpoint_every` steps and at the last, then a sample grid every `sample_every` steps and at the last.
Every rank runs it, since the averaging needs them all; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.errors import ConfigError
from trainers.runtime.distributed import World, close_world, init_world
from trainers.runtime.runs import log_metrics, new_run_dir, trim_metrics, write_pairs, write_run_config

T = TypeVar("T")


def compiled(forward: Callable[..., T], backend: str | None) -> Callable[..., T]:
    """`forward` (a module, or a model's loss method) under torch.compile with `backend` (`--compile`:
    inductor, the compiler; aot_eager, tracing only), else itself. Only the training step calls it: the
    module itself, its state_dict, the EMA and sampling stay eager, so checkpoints do not depend on it."""
    if not backend:
        return forward
    import torch

    return torch.compile(forward, backend=backend)


def lr_at(step: int, config: Any) -> float:
    """Learning rate of step `step` (0-based) of a config with lr, warmup and steps (`trainers dalle`,
    `trainers clip`): linear warm-up over `warmup` steps (at most half of them), then cosine to 0."""
    warmup = min(config.warmup, config.steps // 2)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def launch(
    config: Any, train: Callable[[World, str, Any], T], progress: Any = None, split_batch: bool = True
) -> T:
    """Validate `config`, join the world torchrun describes (one process without it), refuse a global
    `--batch-size` the ranks cannot split equally (`split_batch`), and return `train(world, device,
    progress)` (`progress` on rank 0, None on the others: one bar), leaving the world whatever happens."""
    from trainers.runtime.checkpoints import forget_checkpoints

    config.validate()
    world, device = init_world(config.device)
    try:
        if split_batch:
            world.local_batch(config.batch_size)
        return train(world, device, progress if world.main else None)
    except BaseException as e:  # an error, Ctrl-C: a run folder opened for nothing is not left behind
        removed = discard_empty_runs()
        if not interrupted(e):
            raise
        if world.main:  # Ctrl-C reaches every rank: rank 0 says what is left to continue from
            say_interrupted([run_dir for run_dir in _OPENED if run_dir not in removed], removed)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise KeyboardInterrupt from e  # exit code 130 (Typer), not the traceback of what it broke
    finally:
        _OPENED.clear()
        forget_checkpoints()
        close_world(world)


def interrupted(error: BaseException) -> bool:
    """A Ctrl-C, or an error raised while one unwound: torch.save's zip writer, stopped mid-write, raises
    its own RuntimeError ("unexpected pos") on the way out."""
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, KeyboardInterrupt):
        seen = seen.__context__
    return seen is not None


def say_interrupted(kept: list[Path], removed: list[Path]) -> None:
    """One line on stderr for a run stopped by Ctrl-C: the checkpoint it would continue from (the last it
    wrote, else the one it resumed) with its step, or that there is none yet, and the run folder it
    removed (`discard_empty_runs`) or kept. Typer then exits with code 130."""
    from rich.markup import escape

    from core.progress import stderr
    from trainers.runtime.checkpoints import latest_checkpoint

    latest = latest_checkpoint()
    if latest is not None:
        line = f"interrupted: the last checkpoint is {latest[0]} (step {latest[1]:,})"
    else:
        line = "interrupted: no checkpoint was written yet"
        if removed:
            line += f"; the run folder {removed[0]} held no step's work and was removed"
        elif kept:
            line += f"; the run folder {kept[0]} keeps its metrics so far"
    stderr.print(escape(line), highlight=False, soft_wrap=True)


_OPENED: list[Path] = []  # the new run directories this process opened (open_run), until launch ends
EMPTY_RUN_FILES = {"config.json", "pairs.txt", "metrics.jsonl"}  # what a run writes before its first step


def discard_empty_runs() -> list[Path]:
    """Remove the run directories this process opened that hold no step's work yet: nothing but what
    open_run and write_config wrote, and no metrics line; -> those removed. A run stopped after a step
    keeps its folder (its metrics, samples and checkpoints are what the user looks at). A SIGKILL leaves
    the folder."""
    import shutil

    removed = []
    for run_dir in _OPENED:
        try:
            files = {p.name: p for p in run_dir.iterdir()}
            metrics = files.get("metrics.jsonl")
            if set(files) <= EMPTY_RUN_FILES and (metrics is None or metrics.stat().st_size == 0):
                shutil.rmtree(run_dir)
                removed.append(run_dir)
        except OSError:
            pass  # gone already, or not ours to judge
    return removed


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from; the empty one for a new run."""

    path: Path | None = None
    state: dict | None = None

    @property
    def step(self) -> int:
        """Steps done before this invocation (0 for a new run)."""
        return int(self.state["step"]) if self.state is not None else 0

    def finished(self, steps: int) -> bool:
        """The checkpoint has reached --steps already: nothing to do (say so, touch nothing)."""
        return self.state is not None and self.step >= steps


def load_resume(config: Any, kind: str, state: dict | None = None) -> Resume:
    """`config.resume` (a checkpoint file or a run directory's latest) and its `trainers {kind}` checkpoint;
    `state` when the caller has read it already (`trainers.runtime.runs.resolve_run_config`), so a big one is
    read
    once. No --resume: the empty Resume."""
    from trainers.runtime.checkpoints import load_checkpoint, note_checkpoint, resolve_checkpoint

    if config.resume is None:
        return Resume()
    path = resolve_checkpoint(config.resume, "--resume")
    resume = Resume(path, state or load_checkpoint(path, "--resume", kinds=(kind,)))
    note_checkpoint(path, resume.step)  # what a Ctrl-C before the next checkpoint names
    return resume


def load_init_state(config: Any, kind: str) -> tuple[Path | None, dict | None]:
    """(path, checkpoint) of `--init`, a `trainers {kind}` one whose weights start a new run; (None, None)
    without it."""
    from trainers.runtime.checkpoints import load_init

    return load_init(config.init, kind) if config.init is not None else (None, None)


def check_condition_dim(cache: Any, dim: int, clip_dim: int) -> None:
    """The loader's conditions must live in the space of the cache's CLIP."""
    if dim != clip_dim:
        raise ConfigError(f"--cache {cache}: conditions are {dim}-d but its CLIP is {clip_dim}-d")


def check_autoencoder_fits(info: Any, clip_dim: int, cache: Any, autoencoder: str, resolution: int) -> None:
    """A frozen autoencoder (`autoencoder`: its flag and path, for the message) trained on `resolution` px
    images against the loader's images (`info`: trainers.data.loader.LoaderInfo), and the conditions' size."""
    if info.image_size != resolution:
        raise ConfigError(
            f"{autoencoder}: trained on {resolution}px images, the cache has {info.image_size}px ones"
        )
    check_condition_dim(cache, info.dim, clip_dim)


def prompt_grid(clip: Any, prompts, per_prompt: int):
    """The sample grid's conditions [P * n, D]: each prompt's CLIP text feature, `per_prompt` times."""
    from core.clip import encode_texts

    prompt_h = encode_texts(clip, list(prompts)).clone()  # [P, D]; clone: out of inference mode
    return prompt_h.repeat_interleave(per_prompt, dim=0)  # [P * n, D]


def cache_prompt_grid(clip_info: Any, device: Any, prompts, per_prompt: int):
    """`prompt_grid` with the cache's CLIP (feature_cache.clip_record.EmbeddedClip), loaded for it and
    dropped.
    Call it before seeding: loading a CLIP seeds torch."""
    from core.clip import load_clip

    text_clip = load_clip(clip_info.clip_model, clip_info.clip_pretrained or None, str(device))
    return prompt_grid(text_clip, prompts, per_prompt)


def clip_record(clip_info: Any, dim: int | None = None) -> dict[str, Any]:
    """The CLIP the conditions live in, as config.json and the checkpoint record it."""
    dim = int(clip_info.dim) if dim is None else dim
    return {"model": clip_info.clip_model, "pretrained": clip_info.clip_pretrained, "dim": dim}


def derived_record(derived: Any) -> dict[str, Any]:
    """What config.json records of the latent or token cache a run looks its inputs up in (None: none)."""
    return {"stage": derived.stage if derived else None, "cached": len(derived) if derived else 0}


def restore(trainer: Any, resume: Resume, init_state: dict | None, modules: list, world: World) -> None:
    """A resumed run's trainer state, step and global RNG states (rank 0's, which every rank shared), or a
    new run's --init weights (fresh optimisers); then rank 0's `modules` on every rank."""
    from trainers.runtime.checkpoints import restore_rng

    if resume.state is not None:
        trainer.load_state_dict(resume.state)
        trainer.step = resume.step
        restore_rng(resume.state["rng"])
    elif init_state is not None:
        trainer.load_state_dict(init_state, weights_only=True)
    world.broadcast(modules)


def open_run(config: Any, resume: Resume, pair_keys: list[str] | None = None) -> Path:
    """Rank 0's run directory: a new `OUT/{idx:03d}-{name}` with the few-shot run's pairs.txt, or the
    resumed checkpoint's, its metrics.jsonl cut back to the checkpoint (the steps after are redone)."""
    if resume.state is None:
        run_dir = new_run_dir(config.out, config.name)
        _OPENED.append(run_dir)
        write_pairs(run_dir, pair_keys)
        return run_dir
    trim_metrics(resume.path.parent / "metrics.jsonl", resume.step)
    return resume.path.parent


def write_config(run_dir: Path, kind: str, config: Any, **record: Any) -> None:
    """config.json: the kind, the resolved config's fields, then the run's record (arch, clip, data...)."""
    write_run_config(run_dir, {"kind": kind, **config.to_dict(), **record})


def checkpoint_record(kind: str, config: Any, **record: Any) -> dict[str, Any]:
    """What a checkpoint holds besides the trainer's state: the kind, the config, the run's record."""
    return {"kind": kind, "config": config.to_dict(), **record}


def bf16_autocast(enabled: bool):
    """The trainers' mixed precision: bf16 autocast where `enabled` (on CUDA), nothing elsewhere."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def update_ema(ema: Any, model: Any, step: int, decay: float) -> None:
    """EMA <- lerp(model, EMA, d) after step `step`, d = min(decay, (1 + step) / (10 + step)): warmed up,
    so an early EMA follows the model. One fused call instead of a lerp per tensor."""
    import torch

    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - d)


@dataclass
class SampleGrid:
    """The sample grid a run writes: `draw()` -> uint8 [P * n, 3, R, R] from its own seeded generator (a
    grid does not move the training RNG), one row per prompt, `per_prompt` columns."""

    draw: Callable[[], Any]
    prompts: list[str]
    per_prompt: int
    every: int  # steps between grids, 0 for the final one only


@dataclass
class Trained:
    """What the step loop did: on every rank the steps and the last logged losses, on rank 0 the files."""

    step: int  # steps done in total (including those before a resume)
    losses: dict[str, float] = field(default_factory=dict)  # of the last logged step, over the ranks
    images_per_s: float = 0.0  # global-batch images over this invocation's steps, at the last log step
    checkpoint: Path | None = None  # the last checkpoint written
    samples: list[Path] = field(default_factory=list)  # sample grids written


def due(every: int, done: int, last: bool) -> bool:
    """A step `done` falls on the `every` schedule (0: the last step only) or is the last."""
    return bool(every and done % every == 0) or last


def step_counter(progress: Callable[[int], None] | None) -> Callable[..., None] | None:
    """A caller's `progress(n)` as the loop's `advance(**bar_fields)`: 1 per step, the fields unused."""
    return None if progress is None else (lambda **fields: progress(1))


def train_steps(
    trainer: Any,
    batches: Iterator[dict],
    config: Any,
    run_dir: Path | None,
    record: dict[str, Any],
    *,
    grid: SampleGrid | None = None,
    advance: Callable[..., None] | None = None,
    log_rate: bool = True,
) -> Trained:
    """Steps `trainer.step` (0, or where `restore` put a resumed run) to `config.steps` on `trainer.world`'s
    ranks (see the module docstring). `run_dir`: rank 0's (None on the others); a checkpoint holds `record`
    (`checkpoint_record`) and `trainer.state_dict()`, to which `save_checkpoint` adds the step and the RNG
    states; `advance(losses=)` at log steps and `advance()` at the others, after each step (a progress
    bar, whose rate is its own: steps/s from the first step, in one unit throughout); `log_rate`:
    metrics.jsonl lines carry images_per_s."""
    from trainers.runtime.checkpoints import save_checkpoint

    world = trainer.world
    trained = Trained(trainer.step)
    t0, images = time.perf_counter(), 0
    with open(run_dir / "metrics.jsonl", "a") if world.main else contextlib.nullcontext() as log:
        for step in range(trainer.step, config.steps):
            batch = next(batches)
            losses = trainer.train_step(batch)
            done, images = step + 1, images + batch["image"].shape[0] * world.size
            last = done == config.steps
            bar_fields = {}
            if due(config.log_every, done, last):
                trained.images_per_s = images / max(time.perf_counter() - t0, 1e-9)
                trained.losses = world.mean_scalars(losses)  # the global batch's, on every rank
                if log is not None:
                    extra = {"images_per_s": trained.images_per_s} if log_rate else {}
                    log_metrics(log, done, trained.losses, **extra)
                bar_fields = {"losses": trained.losses}
            if advance is not None:
                advance(**bar_fields)
            trained.step = done
            if not world.main:
                continue
            if due(config.checkpoint_every, done, last):
                trained.checkpoint = save_checkpoint(run_dir, done, {**record, **trainer.state_dict()})
            if grid is not None and due(grid.every, done, last):
                from trainers.engine.grid import write_grid

                path = run_dir / f"samples-{done:07d}.png"
                write_grid(path, grid.draw(), grid.prompts, grid.per_prompt)
                trained.samples.append(path)
    return trained
