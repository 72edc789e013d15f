"""`trainers compare`: one generator per (condition, seed) at the same budget, the same eval for each.

This is how a user decides which pseudo text features to train on: every conditioning source
(`perturb`, `retrieve`, `optimize`, `caption`) gets the same generator, steps, batch, size and learning
rate, is evaluated by `trainers eval` with the same n, prompts and seed, and is sampled for the same
prompts. The report (trainers/compare_report.py) puts the runs side by side, with the chance and
real-image rows, and the feature-level Lafite2 Figure 1 histograms (trainers/compare_features.py).

    OUT/runs/{condition}-s{seed}/000-{family}/      the run (its final checkpoint, config.json, metrics;
                                                    pairs.txt for the few-shot arms)
    OUT/runs/{condition}-s{seed}/eval/eval.json     `trainers eval` of it
    OUT/runs/{condition}-s{seed}/samples.png        `trainers sample` of the sample prompts (+ samples/)
    OUT/runs/pretrain-s{seed}/000-{family}/         fewshot arms only: the seed's shared pre-training
    OUT/vae/000-vae/                                ldm: one VAE, trained once, shared by every run
    OUT/dvae/000-dvae/                              dalle: one dVAE, the same way
    OUT/_manifests/{condition}-s{seed}.json         the run's commit point, written last
    OUT/_manifests/vae.json (or dvae.json)
    OUT/results.json, results.csv, report.md, accuracy_bars.png, samples.png (+ fewshot.png with arms)
    OUT/features.json, features.md, similarity_histograms.png       (feature level, no training)

Each run is a keyed unit, like a stage shard (manifests/; the units: trainers/compare_units.py):

    key = hash("compare/{generator}", COMPARE_VERSION, keyed params, sorted dep digests)

Keyed params: the generator's whole config except where it writes and how it runs (out, name, device,
workers, how often it logs, samples and checkpoints), the eval settings (n, seed, batch, prompts) and the
sample prompts and seed. Deps: the cache CLIP's identity; the output digests of the stages the condition
reads (embed tars and sidecars for all; + optimize; + retrieve and captions); the probe (its config, or
the --probe file's content); for ldm and dalle the shared VAE's or dVAE's checkpoint content digest; for
a fewshot arm its pre-training checkpoint's (the arms: trainers/compare_arms.py). So a rerun does nothing
when every run is committed, changing the budget reruns every run, adding a condition or a seed runs only
the new ones, and a run killed at any instant (a run directory without a matching manifest) is removed
and redone. The whole compare holds OUT/.lock.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from manifests import (
    Dep,
    clean_temp_files,
)
from manifests.manifest import MANIFEST_DIR
from pipeline.errors import ConfigError, require_at_least
from trainers.compare_arms import Arm, parse_arm
from trainers.compare_units import (
    Unit,
    autoencoder_unit,
    cache_deps,
    check_unit,
    do_autoencoder,
    do_pretrain,
    do_run,
    pretrain_units,
    probe_config,
    probe_dep,
    run_units,
    unit_checkpoint,
)
from trainers.generators import FAMILIES, Autoencoder, autoencoder_kinds, member
from trainers.ldm_config import SPACES

GENERATORS = tuple(FAMILIES)
CONDITIONS = ("perturb", "retrieve", "optimize", "caption")  # trainers.conditions.CONDITIONS, in report order

# Budgets per preset and generator; explicit flags override them. Sized on the 2-core development machine,
# 2 threads, the demo's cache (lafite-rn32 CLIP, 32 px), 2026-12-07; BENCHMARKS.md has each compare's
# wall time. gan: 4,000 tiny-GAN steps of batch 8 took 237-274 s a run (the demo's 4 runs, probe and
# reports: 17 minutes, on a machine that ran the old 1,000 steps of 32 in 186 s where another took 112 s);
# `trainers eval` of 500 images about 1 s; the default probe about 15 s, once per cache. ldm: 2,000
# mini-VAE steps about 4 minutes, then 6,000 tiny-DiT steps 2.5-3 minutes a run; dalle: 2,000 mini-dVAE
# steps 3.6 minutes, then 3,000 mini-transformer steps about 5.5 minutes a run. gpu: not measured yet (no
# GPU was lent); the demo's and `trainers gan`'s GPU defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # seconds: checks the wiring (the tests); a probe far too small to measure anything
    "smoke": {
        "gan": dict(size="tiny", steps=2, batch_size=4, eval_n=16),
        "ldm": dict(
            size="tiny", steps=2, batch_size=4, eval_n=16, vae_size="tiny", vae_steps=2, sample_steps=4
        ),
        "dalle": dict(size="tiny", steps=2, batch_size=4, eval_n=16, vae_size="tiny", vae_steps=2),
        "probe": dict(probe_n_train=64, probe_epochs=1, probe_n_eval=0),
    },
    # 2 conditions x 2 seeds of the GAN: 17 minutes on 2 cores of a slow day (2026-12-07), 32 px
    "cpu": {
        # batch 8: at this size the GAN learns from updates more than from images; 4,000 steps of 8 drew
        # shape 0.57 where 1,000 of 32 drew 0.45 (both at lr 0.01), in 1.3-1.9x the time (BENCHMARKS.md)
        "gan": dict(size="tiny", steps=4000, batch_size=8, eval_n=500),
        # the mini VAE keeps shape 0.78-0.84 of the real images' reading, tiny 0.49; in its latents the tiny
        # DiT (lr 1e-3) draws more of the objects than in pixel space at the same steps (BENCHMARKS.md)
        "ldm": dict(
            size="tiny",
            steps=6000,
            batch_size=32,
            eval_n=500,
            vae_size="mini",
            vae_steps=2000,
            space="latent",
        ),
        # the mini fsq dVAE (512 codes) keeps colour 0.97 and position 1.00 of the real images' reading on
        # the demo's world, where tiny's 64 codes keep 0.52 and 0.83 (BENCHMARKS.md)
        "dalle": dict(size="mini", steps=3000, batch_size=32, eval_n=500, vae_size="mini", vae_steps=2000),
        "probe": dict(),
    },
    # one GPU: the small (64 px) and S sizes, the single-run commands' GPU-scale defaults
    "gpu": {
        "gan": dict(size="small", steps=20_000, batch_size=64, eval_n=5000),
        "ldm": dict(size="S", steps=50_000, batch_size=64, eval_n=5000, vae_size="small", vae_steps=10_000),
        "dalle": dict(
            size="small", steps=50_000, batch_size=64, eval_n=5000, vae_size="small", vae_steps=10_000
        ),
        "probe": dict(),
    },
}


@dataclass(frozen=True)
class CompareConfig:
    cache: Path  # the feature cache every run trains on and is evaluated against
    out: Path  # the comparison directory (layout in the module docstring)
    generator: str = "gan"  # gan, ldm (trainers vae once + trainers ldm) or dalle (trainers dvae + dalle)
    conditions: tuple[str, ...] = CONDITIONS  # conditioning sources compared, in report order
    seeds: tuple[int, ...] = (0, 1)  # one run per (condition, seed); the spread over seeds is the error bar
    preset: str = "cpu"  # smoke | cpu | gpu: where the budget below came from (recorded only)
    size: str = "tiny"  # generator size: an entry of its family's size registry (trainers.generators)
    steps: int = 1000  # training steps of every run
    batch_size: int = 32  # images per step of every run (and of the VAE)
    lr: float | None = None  # learning rate of every run; None: the generator's default
    eval_n: int = 500  # images `trainers eval` generates per run (and real images it compares)
    eval_seed: int = 0  # eval prompts, noise and real-image draw: the same for every run
    eval_batch_size: int = 100  # images per generator call in eval (keyed: it seeds the noise per batch)
    probe: Path | None = None  # a `trainers probe` file; None: trained once per cache with probe_* below
    probe_n_train: int = 6000  # the probe's rendered training images (trainers.probe_config.ProbeConfig)
    probe_epochs: int = 6  # the probe's passes over them
    probe_n_eval: int = 1000  # the probe's own held-out check (recorded in its file)
    vae_size: str = "tiny"  # ldm, dalle: the shared autoencoder's size (VAE_SIZES, DVAE_SIZES entry)
    vae_steps: int = 2000  # ldm, dalle: the shared autoencoder's training steps
    sample_steps: int = 50  # ldm: sampler steps in eval and samples
    sample_prompts: tuple[str, ...] | None = None  # samples.png rows; None: pipeline.demo.DEMO_PROMPTS
    sample_seed: int = 0  # noise of the sample images
    device: str = "auto"  # auto, cpu, cuda, cuda:N (recorded, not keyed)
    allow_partial: bool = False  # runs may train on a partial cache (unkeyed: the cache deps are keyed)
    features: bool = True  # also write the feature-level report (trainers.compare_features)
    space: str = "latent"  # ldm: diffuse the shared VAE's latents, or the pixels (trainers.ldm_space)
    language_free: str = "optimize"  # arms: what fewshot pre-trains on and semi mixes captions into
    finetune_share: float = 0.25  # fewshot arms: the share of the budget spent fine-tuning on the pairs

    @classmethod
    def from_preset(cls, preset: str = "cpu", generator: str = "gan", **given: Any) -> CompareConfig:
        """The preset's budget for the generator, then every value in `given` that is not None."""
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
        if generator not in GENERATORS:
            raise ConfigError(f"--generator {generator}: choose one of {', '.join(GENERATORS)}")
        values = {**PRESETS[preset][generator], **PRESETS[preset]["probe"]}
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(preset=preset, generator=generator, **values)

    @property
    def autoencoder(self) -> Autoencoder | None:
        """The autoencoder every run works in, trained once (None: the gan, and the ldm in pixel space)."""
        if self.generator == "ldm" and self.space == "pixel":
            return None
        return FAMILIES[self.generator].autoencoder

    @property
    def prompts(self) -> tuple[str, ...]:
        if self.sample_prompts is not None:
            return self.sample_prompts
        from pipeline.demo import DEMO_PROMPTS  # here: the demo runs a compare, so no import at the top

        return DEMO_PROMPTS

    def validate(self) -> None:
        from trainers.conditions import check_condition

        if self.generator not in GENERATORS:
            raise ConfigError(f"--generator {self.generator}: choose one of {', '.join(GENERATORS)}")
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset {self.preset}: choose one of {', '.join(PRESETS)}")
        if not self.conditions:
            raise ConfigError(f"--conditions: give at least one of {', '.join(CONDITIONS)}")
        for condition in self.conditions:  # optimize:VARIANT compares a variant; fewshot:P etc. are arms
            if parse_arm(condition) is None:
                check_condition(condition, "--conditions")
        check_condition(self.language_free, "--language-free")
        if self.language_free == "caption":
            raise ConfigError("--language-free caption: give a pseudo-feature condition, e.g. optimize")
        if not 0 < self.finetune_share < 1:
            raise ConfigError("--finetune-share must be between 0 and 1 (exclusive)")
        if self.steps < 2 and any(a.kind == "fewshot" for a in self.arms):
            raise ConfigError("--steps: a fewshot arm pre-trains and fine-tunes, so it needs at least 2")
        if len(set(self.conditions)) != len(self.conditions):
            raise ConfigError("--conditions: a condition is listed twice")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed, e.g. 0,1")
        if min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--seeds: seeds must be distinct and 0 or more")
        sizes = member(FAMILIES[self.generator].sizes)
        if self.size not in sizes:
            raise ConfigError(f"--size {self.size}: the {self.generator} sizes are {', '.join(sizes)}")
        if self.space not in SPACES or (self.space != "latent" and self.generator != "ldm"):
            raise ConfigError(f"--space {self.space}: latent, or pixel with --generator ldm")
        autoencoder = self.autoencoder
        if autoencoder is not None and self.vae_size not in (vae_sizes := member(autoencoder.sizes)):
            raise ConfigError(
                f"--vae-size {self.vae_size}: the {autoencoder.title} sizes are {', '.join(vae_sizes)}"
            )
        require_at_least(
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 2),  # the GAN's InfoNCE contrasts within the batch
            ("--eval-n", self.eval_n, 2),
            ("--eval-seed", self.eval_seed, 0),
            ("eval_batch_size", self.eval_batch_size, 1),
            ("probe_n_train", self.probe_n_train, 16),
            ("probe_epochs", self.probe_epochs, 1),
            ("probe_n_eval", self.probe_n_eval, 0),
            ("--vae-steps", self.vae_steps, 1),
            ("--sample-steps", self.sample_steps, 1),
            ("sample_seed", self.sample_seed, 0),
        )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("--lr must be a positive number")
        if self.probe is not None and not Path(self.probe).is_file():
            raise ConfigError(
                f"--probe {self.probe}: file not found; make one with `trainers probe --out FILE`"
            )
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ConfigError("sample prompts: give at least one non-empty prompt")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")
        if not Path(self.cache).is_dir():
            raise ConfigError(f"--cache {self.cache}: no such directory; make one with `pipeline embed`")
        with contextlib.suppress(ValueError):
            Path(self.cache).resolve().relative_to(out.resolve())
            raise ConfigError(f"--out {out}: the cache is inside it; give a separate directory")

    @property
    def arms(self) -> list[Arm]:
        return [arm for c in self.conditions if (arm := parse_arm(c)) is not None]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("cache", "out", "probe"):
            out[key] = None if out[key] is None else str(out[key])
        out["conditions"], out["seeds"] = list(self.conditions), list(self.seeds)
        out["sample_prompts"] = list(self.prompts)
        return out


def parse_list(text: str, flag: str, kind: type = str) -> tuple:
    """`perturb,optimize` / `0,1` -> a tuple; a bad item is a ConfigError naming the flag."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return tuple(kind(item) for item in items)
    except ValueError:
        raise ConfigError(f"{flag} {text}: give comma-separated {kind.__name__} values, e.g. 0,1") from None


def command_line(config: CompareConfig) -> str:
    """The one command that reproduces this comparison (every budget flag spelled out)."""
    parts = [
        f"trainers compare --cache {config.cache} --out {config.out} --generator {config.generator}",
        f"--conditions {','.join(config.conditions)} --seeds {','.join(map(str, config.seeds))}",
        f"--preset {config.preset} --size {config.size} --steps {config.steps}",
        f"--batch-size {config.batch_size} --eval-n {config.eval_n}",
    ]
    if config.lr is not None:
        parts.append(f"--lr {config.lr}")
    if config.eval_seed:
        parts.append(f"--eval-seed {config.eval_seed}")
    if config.probe is not None:
        parts.append(f"--probe {config.probe}")
    if config.allow_partial:
        parts.append("--allow-partial")
    family = FAMILIES[config.generator]
    if config.space != "latent":
        parts.append(f"--space {config.space}")
    if config.autoencoder is not None:
        parts.append(f"--vae-size {config.vae_size} --vae-steps {config.vae_steps}")
    if "steps" in family.sampler:
        parts.append(f"--sample-steps {config.sample_steps}")
    if config.arms:
        parts.append(f"--language-free {config.language_free} --finetune-share {config.finetune_share}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CompareResult:
    config: CompareConfig
    rows: list[dict[str, Any]]  # one per run, results.csv's rows
    summary: dict[str, dict[str, dict[str, float | None]]]  # condition -> metric -> mean/std/min/max/n
    chance: dict[str, dict[str, float]]  # acc / acc_seen / acc_held_out -> attribute -> chance
    real: dict[str, float | None]  # real images: clip_score and attribute accuracy (the ceiling)
    ran: list[str]  # units (re)made by this call
    up_to_date: list[str]  # units already committed
    reasons: dict[str, str] = field(default_factory=dict)  # unit -> why it was (re)made
    files: dict[str, Path] = field(default_factory=dict)  # results_json, results_csv, report, figures...
    features: dict[str, Any] | None = None  # the feature-level report, when written
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def noop_progress(**_: Any) -> None:
    return None


@dataclass
class Plan:
    units: list[Unit]  # the evaluated runs, in report order
    vae: Unit | None  # the shared autoencoder (ldm: VAE, dalle: dVAE); None for the gan
    pretrains: list[Unit]  # the fewshot arms' pre-training, one per seed (none without a fewshot arm)
    probe: Dep  # the probe every eval uses, as a dep of every run
    reasons: dict[str, str | None]  # unit -> why it must be (re)made, None when committed

    def pending(self) -> list[Unit]:
        """Every unit still to make, in the order they are made."""
        units = ([self.vae] if self.vae is not None else []) + self.pretrains + self.units
        return [u for u in units if self.reasons[u.name] is not None]


def plan_compare(config: CompareConfig) -> Plan:
    """Which units are committed and which must run (and why), reading only manifests and file stats.
    A unit whose prerequisite is still to make (the shared VAE; a fewshot run's pre-training) is planned
    against a checkpoint not known yet, and says so."""
    from trainers.embed_rows import cache_image_size

    cache, out = Path(config.cache), Path(config.out)
    probe = probe_dep(config, cache_image_size(cache))
    vae_checkpoint, reasons = None, {}
    vae = autoencoder_unit(config, cache_deps(cache, "perturb"))  # perturb: the embed stage alone
    if vae is not None:
        reasons[vae.name] = check_unit(out, vae)
        if reasons[vae.name] is None:
            vae_checkpoint = unit_checkpoint(out, vae.name)
    vae_pending = vae is not None and reasons[vae.name] is not None
    autoencoder = config.autoencoder
    vae_first = f"the shared {autoencoder.title} is trained first" if autoencoder is not None else ""
    pretrains, pretrained = pretrain_units(config, vae_checkpoint), {}
    for unit in pretrains:
        reasons[unit.name] = vae_first if vae_pending else check_unit(out, unit)
        if reasons[unit.name] is None:
            pretrained[unit.seed] = unit_checkpoint(out, unit.name)
    units = run_units(config, probe, vae_checkpoint, pretrained)
    for unit in units:
        pretrain = unit.params.get("pretrain")
        if vae_pending:
            reasons[unit.name] = vae_first
        elif pretrain is not None and unit.seed not in pretrained:
            reasons[unit.name] = f"its pre-training ({pretrain}) is trained first"
        else:
            reasons[unit.name] = check_unit(out, unit)
    return Plan(units, vae, pretrains, probe, reasons)


def _probe(config: CompareConfig):
    from trainers.embed_rows import cache_image_size
    from trainers.probe import cached_probe, load_probe

    if config.probe is not None:
        return load_probe(Path(config.probe), config.device)
    image_size = cache_image_size(Path(config.cache))
    return cached_probe(Path(config.cache), probe_config(config, image_size), image_size=image_size)[0]


def _lock(out: Path):
    from manifests.lock import CacheLock, LockHeld, read_lock

    lock = CacheLock(out)
    try:
        lock.acquire()
    except LockHeld:
        holder = read_lock(out)
        raise ConfigError(
            f"--out {out}: another `trainers compare` (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}) is writing it; wait for it to finish or give another --out"
        ) from None
    return lock


def run_compare(config: CompareConfig, progress: Callable[..., None] | None = None) -> CompareResult:
    """Make every missing or stale unit (the shared VAE, then the pre-trainings, then the evaluated
    runs), then the results, report, figures and feature-level report.

    `progress(**fields)` is called with `total_runs=` and `total_steps=`, then `steps=n` after training
    steps, `runs=1` after each committed run or pre-training, and `status=` text (see `compare_progress`)."""
    from trainers.compare_report import write_outputs

    config.validate()
    progress = progress or noop_progress
    t0 = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        for folder in (out, out / MANIFEST_DIR):
            clean_temp_files(folder)
        plan = plan_compare(config)
        first_reasons = dict(plan.reasons)
        _announce(progress, plan)
        ran: list[Unit] = []
        if plan.vae is not None and plan.pending():
            if plan.reasons[plan.vae.name] is not None:
                do_autoencoder(config, plan.vae, progress)
                ran.append(plan.vae)
            _encode(config, plan.vae, progress)
            plan = plan_compare(config)  # an autoencoder retrained byte-identical keeps its runs
            _announce(progress, plan, ran)
        for unit in [u for u in plan.pretrains if plan.reasons[u.name] is not None]:
            do_pretrain(config, unit, progress)
            ran.append(unit)
            progress(runs=1)
        if any(u.kind not in autoencoder_kinds() for u in ran):
            plan = plan_compare(config)  # the fewshot runs, keyed on their pre-training's checkpoint
        todo = [u for u in plan.units if plan.reasons[u.name] is not None]
        if todo:
            probe = _probe(config)
            for unit in todo:
                do_run(config, unit, probe, progress)
                ran.append(unit)
                progress(runs=1)
        progress(status="report")
        names = [u.name for u in ran]
        up_to_date = [u.name for u in plan.units if u.name not in names]
        reasons = {name: first_reasons.get(name) or plan.reasons.get(name) or "" for name in names}
        result = CompareResult(config, [], {}, {}, {}, names, up_to_date, reasons)
        write_outputs(config, plan.units, result)
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        lock.release()


def _announce(progress: Callable[..., None], plan: Plan, done: list[Unit] = ()) -> None:
    """The bars' totals: the units made so far plus those still pending (runs: all but the autoencoder)."""
    units = list(done) + plan.pending()
    runs = [u for u in units if u.kind not in autoencoder_kinds()]
    progress(total_runs=len(runs), total_steps=sum(u.train.steps for u in units))


def _encode(config: CompareConfig, autoencoder: Unit, progress: Callable[..., None]) -> None:
    """With the shared autoencoder committed: encode the cache with it (`trainers vae --encode`' latents,
    `trainers dvae --encode`' tokens; only stale shards are encoded), so no run encodes images on the fly."""
    progress(status=f"{autoencoder.kind} --encode")
    checkpoint = unit_checkpoint(Path(config.out), autoencoder.name)[0]
    encode = member(config.autoencoder.encode)
    encode(Path(config.cache), checkpoint, batch_size=64, device=config.device)


def features_only(config: CompareConfig) -> dict[str, Any]:
    """The feature-level report alone (no training): OUT/features.json, features.md and the histograms."""
    from trainers.compare_features import feature_report

    Path(config.out).mkdir(parents=True, exist_ok=True)
    methods = [c for c in config.conditions if parse_arm(c) is None]
    if config.arms:  # the arms' features: the language-free condition's and the captions'
        methods += [c for c in (config.language_free, "caption") if c not in methods]
    return feature_report(
        Path(config.cache),
        Path(config.out),
        methods=tuple(methods),
        device=config.device,
        seed=config.eval_seed,
    )


@contextlib.contextmanager
def compare_progress(enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A bar over runs and one over training steps, with the status (`pipeline.progress`: live on a
    terminal, plain lines elsewhere)."""
    from pipeline.progress import bar_columns, make_progress

    if not enabled:
        yield noop_progress
        return
    with make_progress(*bar_columns("status")) as bar:
        runs = bar.add_task("compare runs", total=None, status="")
        steps = bar.add_task("compare steps", total=None, status="", unit="step")

        def update(**fields: Any) -> None:
            if "total_runs" in fields:
                bar.update(runs, total=fields["total_runs"])
                bar.update(steps, total=fields["total_steps"])
            if fields.get("steps"):
                bar.update(steps, advance=fields["steps"])
            if fields.get("runs") or "status" in fields:
                status = {"status": fields["status"]} if "status" in fields else {}
                bar.update(runs, advance=fields.get("runs", 0), **status)

        yield update


def describe(result: CompareResult) -> str:
    from trainers.compare_report import text_table

    done = f"{len(result.ran)} run(s) made, {len(result.up_to_date)} up to date"
    report = result.files.get("report")
    notes = "".join(f"note: {note}\n" for note in result.notes)
    return f"{text_table(result)}\n{notes}compare: {done} in {result.seconds:.0f} s -> {report}"
