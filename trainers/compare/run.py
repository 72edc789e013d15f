"""`trainers compare`: one generator per (condition, seed) at the same budget, the same eval for each.

This is how a user decides which pseudo text features to train on: every conditioning source
(`perturb`, `retrieve`, `optimize`, `caption`) gets the same generator, steps, batch, size and learning
rate, is evaluated by `trainers eval` with the same n, prompts and seed, and is sampled for the same
prompts. The report (trainers/compare/report.py) puts the runs side by side, with the chance and
real-image rows, and the feature-level Lafite2 Figure 1 histograms (trainers/compare/features.py).

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

Each run is a keyed unit, like a stage shard (manifests/; the units: trainers/compare/units.py):

    key = hash("compare/{generator}", COMPARE_VERSION, keyed params, sorted dep digests)

Keyed params: the generator's whole config except where it writes and how it runs (out, name, device,
workers, how often it logs, samples and checkpoints), the eval settings (n, seed, batch, prompts) and the
sample prompts and seed. Deps: the cache CLIP's identity; the output digests of the stages the condition
reads (embed tars and sidecars for all; + optimize; + retrieve and captions); the probe (its config, or
the --probe file's content); for ldm and dalle the shared VAE's or dVAE's checkpoint content digest; for
a fewshot arm its pre-training checkpoint's (the arms: trainers/compare/arms.py). So a rerun does nothing
when every run is committed, changing the budget reruns every run, adding a condition or a seed runs only
the new ones, and a run killed at any instant (a run directory without a matching manifest) is removed
and redone. The whole compare holds OUT/.lock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.lazy import member
from manifests import (
    Dep,
    clean_temp_files,
)
from manifests.manifest import MANIFEST_DIR
from trainers.compare.config import CompareConfig, CompareResult
from trainers.compare.units import (
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
from trainers.families.registry import autoencoder_kinds

# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


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
    from feature_cache.embed_rows import cache_image_size

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
    from feature_cache.embed_rows import cache_image_size
    from trainers.probe.probe import cached_probe, load_probe

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
    from trainers.compare.report import write_outputs

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


@contextlib.contextmanager
def compare_progress(enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A bar over runs and one over training steps, with the status (`core.progress`: live on a
    terminal, plain lines elsewhere)."""
    from core.progress import bar_columns, make_progress

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
    from trainers.compare.report import text_table

    done = f"{len(result.ran)} run(s) made, {len(result.up_to_date)} up to date"
    report = result.files.get("report")
    notes = "".join(f"note: {note}\n" for note in result.notes)
    return f"{text_table(result)}\n{notes}compare: {done} in {result.seconds:.0f} s -> {report}"
