"""`trainers compare`'s config: its options, their defaults and presets (each family's budgets live with the
family; the probe's here), the checks, the one command line that reproduces a comparison, and its result."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError, require_at_least
from core.lazy import member
from trainers.autoencoders.autoencoder import Autoencoder
from trainers.compare.arms import Arm, parse_arm
from trainers.data.condition_names import CONDITIONS
from trainers.families.ldm.config import SPACES
from trainers.families.registry import FAMILIES

# The probe's budget per preset (each family's runs have theirs: its `presets`); explicit flags override them.
# smoke checks the wiring (the tests), with a probe far too small to measure anything; cpu is sized on 2 cores
# (`trainers eval` of 500 images about 1 s; the default probe about 15 s, once per cache); gpu: one GPU.
PROBE_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(probe_n_train=64, probe_epochs=1, probe_n_eval=0),
    "cpu": dict(),
    "gpu": dict(),
}


@dataclass(frozen=True)
class CompareConfig:
    cache: Path  # the feature cache every run trains on and is evaluated against
    out: Path  # the comparison directory (layout in the module docstring)
    generator: str = "gan"  # gan, ldm (trainers vae once + trainers ldm) or dalle (trainers dvae + dalle)
    conditions: tuple[str, ...] = CONDITIONS  # conditioning sources compared, in report order
    seeds: tuple[int, ...] = (0, 1)  # one run per (condition, seed); the spread over seeds is the error bar
    preset: str = "cpu"  # smoke | cpu | gpu: where the budget below came from (recorded only)
    size: str = "tiny"  # generator size: an entry of its family's size registry (trainers.families.registry)
    steps: int = 1000  # training steps of every run
    batch_size: int = 32  # images per step of every run (and of the VAE)
    lr: float | None = None  # learning rate of every run; None: the generator's default
    eval_n: int = 500  # images `trainers eval` generates per run (and real images it compares)
    eval_seed: int = 0  # eval prompts, noise and real-image draw: the same for every run
    eval_batch_size: int = 100  # images per generator call in eval (keyed: it seeds the noise per batch)
    probe: Path | None = None  # a `trainers probe` file; None: trained once per cache with probe_* below
    probe_n_train: int = 6000  # the probe's rendered training images (trainers.probe.config.ProbeConfig)
    probe_epochs: int = 6  # the probe's passes over them
    probe_n_eval: int = 1000  # the probe's own held-out check (recorded in its file)
    vae_size: str = "tiny"  # ldm, dalle: the shared autoencoder's size (VAE_SIZES, DVAE_SIZES entry)
    vae_steps: int = 2000  # ldm, dalle: the shared autoencoder's training steps
    sample_steps: int = 50  # ldm: sampler steps in eval and samples
    sample_prompts: tuple[str, ...] | None = (
        None  # samples.png rows; None: trainers.compare.prompts.DEMO_PROMPTS
    )
    sample_seed: int = 0  # noise of the sample images
    device: str = "auto"  # auto, cpu, cuda, cuda:N (recorded, not keyed)
    allow_partial: bool = False  # runs may train on a partial cache (unkeyed: the cache deps are keyed)
    features: bool = True  # also write the feature-level report (trainers.compare.features)
    space: str = (
        "latent"  # ldm: diffuse the shared VAE's latents, or the pixels (trainers.families.ldm.space)
    )
    language_free: str = "optimize"  # arms: what fewshot pre-trains on and semi mixes captions into
    finetune_share: float = 0.25  # fewshot arms: the share of the budget spent fine-tuning on the pairs

    @classmethod
    def from_preset(cls, preset: str = "cpu", generator: str = "gan", **given: Any) -> CompareConfig:
        """The preset's budget for the generator, then every value in `given` that is not None."""
        if preset not in PROBE_PRESETS:
            raise ConfigError(f"--preset {preset}: choose one of {', '.join(PROBE_PRESETS)}")
        if generator not in FAMILIES:
            raise ConfigError(f"--generator {generator}: choose one of {', '.join(FAMILIES)}")
        values = {**FAMILIES[generator].presets[preset], **PROBE_PRESETS[preset]}
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
        from trainers.compare.prompts import DEMO_PROMPTS

        return DEMO_PROMPTS

    def validate(self) -> None:
        from trainers.data.conditions import check_condition

        if self.generator not in FAMILIES:
            raise ConfigError(f"--generator {self.generator}: choose one of {', '.join(FAMILIES)}")
        if self.preset not in PROBE_PRESETS:
            raise ConfigError(f"--preset {self.preset}: choose one of {', '.join(PROBE_PRESETS)}")
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
