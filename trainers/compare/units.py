"""The units of `trainers compare` (trainers/compare/run.py): one keyed piece of work per evaluated run,
per fewshot pre-training and for the shared VAE, how each is keyed and checked against its manifest, and
how each is made and committed.

    key = hash("compare/{generator}", COMPARE_VERSION, keyed params, sorted dep digests)

A unit's manifest (OUT/_manifests/{name}.json) is its commit point, written after every file it lists;
a unit folder without one (a killed run) is removed and redone.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.lazy import member
from manifests import Dep, check_outputs, digest_file_content, digest_json, stat_out, write_json_atomic
from manifests.errors import Unreadable, read_json
from manifests.faults import crash_point
from manifests.manifest import MANIFEST_DIR, environment, fingerprint_key
from trainers.compare.arms import arm_run, cache_images, parse_arm, pretrain_name, split_budget
from trainers.families.registry import FAMILIES, autoencoder_kinds, unkeyed

if TYPE_CHECKING:
    from trainers.compare.config import CompareConfig

COMPARE_VERSION = "1"
RUNS_DIR = "runs"


@dataclass
class Unit:
    """One keyed piece of work: a generator run with its eval and samples, a fewshot arm's pre-training
    (trained only), or the shared autoencoder (ldm's VAE, dalle's dVAE)."""

    name: str  # "{condition}-s{seed}", "pretrain-s{seed}", "vae" or "dvae": its folder's and manifest's name
    kind: str  # a generator family (gan, ldm, dalle) or an autoencoder (vae, dvae)
    train: Any  # the GanConfig / LdmConfig / VaeConfig ... it trains with
    params: dict[str, Any]  # keyed
    deps: list[Dep]
    condition: str | None = None
    seed: int | None = None

    @property
    def key(self) -> str:
        return fingerprint_key(
            f"compare/{self.kind}", COMPARE_VERSION, self.params, [d.digest for d in self.deps]
        )

    @property
    def folder(self) -> str:
        return self.name if self.kind in autoencoder_kinds() else f"{RUNS_DIR}/{self.name}"


def manifest_file(out: Path, name: str) -> Path:
    return Path(out) / MANIFEST_DIR / f"{name}.json"


def read_unit_manifest(out: Path, name: str) -> dict[str, Any] | None:
    """The unit's commit point, or None: absent, or damaged (the unit is then redone, with a warning)."""
    path = manifest_file(out, name)
    fix = "the run is redone"
    try:
        manifest = read_json(path, fix)
        if not isinstance(manifest, dict):
            raise Unreadable(f"{path}: not a compare manifest (a JSON object); {fix}")
        return manifest
    except FileNotFoundError:
        return None
    except Unreadable as e:
        warnings.warn(str(e), stacklevel=2)
        return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def check_unit(out: Path, unit: Unit) -> str | None:
    """None when the unit is committed with this key and intact outputs, else why it must be (re)made."""
    manifest = read_unit_manifest(out, unit.name)
    if manifest is None:
        return "unfinished (no manifest)" if (Path(out) / unit.folder).exists() else "new run"
    if manifest.get("key") == unit.key:
        return check_outputs(out, manifest)
    old, new = _flatten(manifest.get("params", {})), _flatten(unit.params)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        return "params changed: " + ", ".join(changed)
    if manifest.get("version") != COMPARE_VERSION:
        return f"compare code version {manifest.get('version')} -> {COMPARE_VERSION}"
    return "inputs changed (cache, probe or VAE)"


def cache_deps(cache: Path, condition: str) -> list[Dep]:
    """What a run on `condition` reads from the cache, by output digest; a missing stage is refused here,
    before anything is trained."""
    from feature_cache.embed_rows import cache_clip
    from manifests import list_manifests
    from trainers.data.conditions import condition_stage, missing_stage_error

    deps = [Dep("clip", digest_json(cache_clip(cache).identity))]
    stages = {"embed": (), "retrieve": ("retrieve", "captions")}.get(
        condition_stage(condition), (condition_stage(condition),)
    )
    for stage, suffixes in (("embed", (".tar", ".parquet")),) + tuple((s, (".parquet",)) for s in stages):
        manifests = list_manifests(cache, stage)
        if not manifests:
            raise missing_stage_error(cache, condition)
        for manifest in manifests.values():  # stats files hold timings: only the data outputs count
            deps += [
                Dep(o["path"], o["digest"]) for o in manifest.get("outs", []) if o["path"].endswith(suffixes)
            ]
    return deps


def probe_config(config: CompareConfig, image_size: int):
    from trainers.probe.config import ProbeConfig

    return ProbeConfig(
        image_size=image_size,
        n_train=config.probe_n_train,
        epochs=config.probe_epochs,
        n_eval=config.probe_n_eval,
        device=config.device,
    )


def probe_dep(config: CompareConfig, image_size: int) -> Dep:
    if config.probe is not None:
        return Dep("probe", digest_file_content(Path(config.probe)))
    return Dep("probe", digest_json(probe_config(config, image_size).keyed()))


def eval_params(config: CompareConfig) -> dict[str, Any]:
    from trainers.eval.config import EvalConfig

    grid = EvalConfig.__dataclass_fields__["grid"].default
    params = {"n": config.eval_n, "seed": config.eval_seed, "batch_size": config.eval_batch_size}
    params.update(prompts="synthetic", grid=grid)
    samples = {"prompts": list(config.prompts), "seed": config.sample_seed, "n": 1}
    if "steps" in FAMILIES[config.generator].sampler:
        params["sampler_steps"] = samples["sampler_steps"] = config.sample_steps
    return {"eval": params, "samples": samples}


def _keyed(kind: str, train_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_dict.items() if k not in unkeyed(kind)}


def autoencoder_unit(config: CompareConfig, embed_deps: list[Dep]) -> Unit | None:
    """The shared autoencoder of the compare's family (None for the gan), trained on the images alone."""
    autoencoder = config.autoencoder
    if autoencoder is None:
        return None
    kind = autoencoder.kind
    train = member(autoencoder.config)(
        cache=Path(config.cache),
        out=Path(config.out) / kind,
        name=kind,
        size=config.vae_size,
        steps=config.vae_steps,
        batch_size=config.batch_size,
        seed=0,
        device=config.device,
        checkpoint_every=0,
        allow_partial=config.allow_partial,
    )
    return Unit(kind, kind, train, {"train": _keyed(kind, train.to_dict())}, embed_deps)


def _train_config(config: CompareConfig, name: str, seed: int, vae: tuple[Path, str] | None, **settings: Any):
    """The generator config of one unit: the compare's budget and settings, plus `settings` (condition,
    steps, and for arms paired_limit / init)."""
    common = dict(
        cache=Path(config.cache),
        out=Path(config.out) / RUNS_DIR / name,
        name=config.generator,
        size=config.size,
        batch_size=config.batch_size,
        seed=seed,
        device=config.device,
        checkpoint_every=0,
        sample_every=0,
        allow_partial=config.allow_partial,
        **settings,
    )
    if config.lr is not None:
        common["lr"] = config.lr
    common.update({name: getattr(config, name) for name in FAMILIES[config.generator].compare_fields})
    if config.autoencoder is not None:  # every run works in the compare's one autoencoder
        common[config.autoencoder.field] = vae[0] if vae is not None else None
    family = FAMILIES[config.generator]
    return member(family.config)(**common)


def _vae_deps(config: CompareConfig, vae: tuple[Path, str] | None) -> list[Dep]:
    autoencoder = config.autoencoder
    if autoencoder is None:
        return []
    return [Dep(autoencoder.kind, vae[1] if vae is not None else "not trained yet")]


def _unit(config: CompareConfig, name: str, train: Any, condition: str, seed: int, deps, **params) -> Unit:
    family = FAMILIES[config.generator]
    keyed = {"generator": config.generator, "condition": condition, "seed": seed, **params}
    if family.version != "1":  # keys of runs made before versions were recorded stay as they were
        keyed["model_version"] = family.version
    keyed["train"] = _keyed(config.generator, train.to_dict())
    return Unit(name, config.generator, train, keyed, deps, condition, seed)


def pretrain_units(config: CompareConfig, vae: tuple[Path, str] | None) -> list[Unit]:
    """The fewshot arms' pre-training, one per seed (none without a fewshot arm): the language-free
    condition for the budget's first part. Keyed without P, so every fewshot:P of a seed shares it."""
    if not any(arm.kind == "fewshot" for arm in config.arms):
        return []
    steps = split_budget(config.steps, config.finetune_share)[0]
    deps = cache_deps(Path(config.cache), config.language_free) + _vae_deps(config, vae)
    units = []
    for seed in config.seeds:
        name = pretrain_name(seed)
        train = _train_config(config, name, seed, vae, condition=config.language_free, steps=steps)
        units.append(_unit(config, name, train, config.language_free, seed, deps))
    return units


def run_units(
    config: CompareConfig,
    probe: Dep,
    vae: tuple[Path, str] | None,
    pretrained: dict[int, tuple[Path, str]] | None = None,
) -> list[Unit]:
    """One evaluated unit per (condition, seed), conditions first in their given order. `vae`: the
    shared VAE's checkpoint and content digest (ldm); `pretrained`: seed -> the committed pre-training's
    checkpoint and content digest, which that seed's fewshot runs start from."""
    pretrained = pretrained or {}
    n_images = cache_images(Path(config.cache)) if config.arms else 0
    units = []
    for condition in config.conditions:
        arm = parse_arm(condition)
        settings = dict(condition=condition, steps=config.steps)
        if arm is not None:
            settings = arm_run(arm, config.language_free, config.steps, config.finetune_share, n_images)
        deps = cache_deps(Path(config.cache), settings["condition"]) + [probe] + _vae_deps(config, vae)
        for seed in config.seeds:
            name = f"{condition.replace(':', '.')}-s{seed}"  # optimize:NAME -> optimize.NAME-s0
            unit_deps, params = deps, eval_params(config)
            if arm is not None and arm.kind == "fewshot":  # its budget: the pre-training's steps and these
                init, digest = pretrained.get(seed, (None, "not trained yet"))
                settings = {**settings, "init": init}
                unit_deps = deps + [Dep("init", digest)]
                params.update(pretrain=pretrain_name(seed), budget=config.steps)
            train = _train_config(config, name, seed, vae, **settings)
            units.append(_unit(config, name, train, condition, seed, unit_deps, **params))
    return units


# ---------------------------------------------------------------------------------------------------------
# Doing a unit
# ---------------------------------------------------------------------------------------------------------


def _outs(out: Path, files: list[Path]) -> list[dict[str, Any]]:
    records = []
    for path in files:
        rel = path.relative_to(out).as_posix()
        records.append(stat_out(out, rel, path.stat().st_size, digest_file_content(path)).__dict__)
    return records


def commit_unit(out: Path, unit: Unit, files: list[Path], timings: dict[str, float], extra: dict) -> dict:
    """Write the unit's manifest: the commit point, after every file it lists is in place."""
    manifest = {
        "unit": unit.name,
        "kind": unit.kind,
        "version": COMPARE_VERSION,
        "key": unit.key,
        "params": unit.params,
        "unkeyed": {"device": unit.train.device, "cache": str(unit.train.cache)},
        "deps": [{"name": d.name, "digest": d.digest} for d in unit.deps],
        "outs": _outs(out, files),
        "env": environment(),
        "timings": timings,
        "created": time.time(),
        **extra,
    }
    crash_point(f"compare:{unit.name}:before_manifest")
    write_json_atomic(manifest_file(out, unit.name), manifest)
    return manifest


def _restart(out: Path, unit: Unit) -> Path:
    """Forget a stale or unfinished unit: its manifest first (so no crash can leave it looking valid),
    then its folder."""
    manifest_file(out, unit.name).unlink(missing_ok=True)
    folder = Path(out) / unit.folder
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def do_autoencoder(config: CompareConfig, unit: Unit, progress: Callable[..., None]) -> dict:
    """Train the shared autoencoder and commit it (its checkpoint and eval.json)."""
    out = Path(config.out)
    _restart(out, unit)
    progress(status=f"{unit.kind}: train")
    t0 = time.perf_counter()
    run = member(config.autoencoder.train)
    result = run(unit.train, lambda n: progress(steps=n))
    files = [result.checkpoint, result.run_dir / "eval.json"]
    extra = {"checkpoint": result.checkpoint.relative_to(out).as_posix(), "psnr_db": result.psnr}
    warn_if_lossy(unit.kind, result.reconstruction)
    return commit_unit(out, unit, files, {"train_s": round(time.perf_counter() - t0, 2)}, extra)


def warn_if_lossy(kind: str, reconstruction: dict | None) -> None:
    """Say loudly when the shared autoencoder's reconstructions lose the objects
    (trainers/autoencoders/recon_probe.py): every generator of the comparison then draws through it, so its
    attribute figures measure the
    autoencoder more than the conditions."""
    from trainers.autoencoders.recon_probe import KEPT_MIN, lost

    gone = lost(reconstruction or {})
    if gone:
        warnings.warn(
            f"the shared {kind}'s reconstructions lose the objects (the probe reads {', '.join(gone)} on the "
            f"real images, under {KEPT_MIN:g} of it): the generators drawing through it cannot show what "
            "their conditions do; train it longer or larger (--vae-steps, --vae-size)",
            stacklevel=2,
        )


def _train(unit: Unit, progress: Callable[..., None]) -> Path:
    """Train the unit's generator; -> its final checkpoint."""
    run = member(FAMILIES[unit.kind].train)
    return run(unit.train, progress=lambda n: progress(steps=n)).checkpoint


def do_pretrain(config: CompareConfig, unit: Unit, progress: Callable[..., None]) -> dict:
    """Train a fewshot arm's pre-training and commit its checkpoint (not evaluated: its fine-tunes are)."""
    out = Path(config.out)
    _restart(out, unit)
    progress(status=f"{unit.name}: train")
    t0 = time.perf_counter()
    checkpoint = _train(unit, progress)
    extra = {"condition": unit.condition, "seed": unit.seed}
    extra["checkpoint"] = checkpoint.relative_to(out).as_posix()
    return commit_unit(out, unit, [checkpoint], {"train_s": round(time.perf_counter() - t0, 2)}, extra)


def _pairs(run_dir: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """A run's pairs.txt (with --paired-limit) and what its config.json says about them."""
    pairs = run_dir / "pairs.txt"
    if not pairs.is_file():
        return [], None
    data = read_json(run_dir / "config.json", "the run is redone").get("data") or {}
    return [pairs], {"n": data.get("pairs"), "digest": data.get("pairs_digest"), "file": pairs}


def do_run(config: CompareConfig, unit: Unit, probe: Any, progress: Callable[..., None]) -> dict:
    """Train, evaluate and sample one run, then commit it."""
    from trainers.eval.config import EvalConfig
    from trainers.eval.evaluate import evaluate
    from trainers.eval.sample import SampleConfig, run_sample
    from trainers.families.load import load_generator

    out = Path(config.out)
    folder = _restart(out, unit)
    progress(status=f"{unit.name}: train")
    t0 = time.perf_counter()
    checkpoint = _train(unit, progress)
    t_train = time.perf_counter()

    progress(status=f"{unit.name}: eval")
    # the sampler steps apply to the families that take them (trainers.families.registry)
    generate, info = load_generator(checkpoint, device=config.device, steps=config.sample_steps)
    eval_config = EvalConfig(
        checkpoint=str(checkpoint),
        cache=Path(config.cache),
        out=folder / "eval",
        n=config.eval_n,
        seed=config.eval_seed,
        batch_size=config.eval_batch_size,
        device=config.device,
    )
    evaluate(eval_config, generate, info, probe=probe)
    t_eval = time.perf_counter()

    progress(status=f"{unit.name}: samples")
    sample = run_sample(
        SampleConfig(
            checkpoint=checkpoint,
            prompts=config.prompts,
            out=folder / "samples.png",
            n=1,
            seed=config.sample_seed,
            device=config.device,
            steps=config.sample_steps,
        )
    )
    pair_files, pairs = _pairs(checkpoint.parent)
    files = [checkpoint, folder / "eval" / "eval.json", sample.grid, *sample.images, *pair_files]
    timings = {
        "train_s": round(t_train - t0, 2),
        "eval_s": round(t_eval - t_train, 2),
        "total_s": round(time.perf_counter() - t0, 2),
    }
    extra = {
        "condition": unit.condition,
        "seed": unit.seed,
        "checkpoint": checkpoint.relative_to(out).as_posix(),
        "eval": (folder / "eval" / "eval.json").relative_to(out).as_posix(),
        "samples": [p.relative_to(out).as_posix() for p in sample.images],
    }
    if pairs is not None:
        extra["pairs"] = {**pairs, "file": pairs["file"].relative_to(out).as_posix()}
    return commit_unit(out, unit, files, timings, extra)


def unit_checkpoint(out: Path, name: str) -> tuple[Path, str]:
    """A committed unit's checkpoint and its content digest (from its manifest)."""
    manifest = read_unit_manifest(out, name)
    ckpt = next(o for o in manifest["outs"] if o["path"] == manifest["checkpoint"])
    return Path(out) / ckpt["path"], ckpt["digest"]
